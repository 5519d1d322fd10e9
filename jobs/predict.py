"""Batch prediction with a trained classifier over any image folder (``python -m jobs.predict --help``)."""

from __future__ import annotations

import sys
from typing import Sequence

from jobs._cli import run_job
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job."""
    return run_job(PredictConfig, __doc__, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
