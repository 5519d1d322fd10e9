"""Batch prediction with a trained classifier over any image folder (``python -m jobs.predict --help``)."""

from jobs._cli import entry
from pipeline.batch.predict import run_prediction
from pipeline.config import PredictConfig


def _run(cfg: PredictConfig) -> None:
    s = run_prediction(cfg)
    evaluation = s.get("evaluation")
    if evaluation:
        m = evaluation["confusion_matrix"]
        print(f"accuracy {evaluation['accuracy']:.4f} on {evaluation['num_samples']} images in class folders")
        print("confusion matrix (rows: true, columns: predicted):")
        width = max(len(c) for c in m["classes"]) + 2
        print(" " * width + "".join(f"{c:>{width}}" for c in m["classes"]))
        for name, row in zip(m["classes"], m["rows_true_cols_predicted"]):
            print(f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    print(f"predicted {s['num_images']} images ({s['num_rejects']} rejected) with the {s['kind']} model, "
          f"{s['precision']}, {s['images_per_s']} images/s -> {s['output']}")


main = entry(PredictConfig, __doc__, _run)

if __name__ == "__main__":
    raise SystemExit(main())
