"""Training throughput: samples/s of the top MLP and of fine-tuning with 1 and 2 Ray Train
workers, and seconds per epoch of each of the three models.

    python bench/train_throughput.py --features-dir outputs/cats_vs_dogs_small/features \
        --top-model outputs/cats_vs_dogs_small/top/model.keras [--epochs 2]

Each configuration is a real Ray Train run (TensorflowTrainer, MultiWorkerMirroredStrategy)
on a local Ray cluster; the first epoch includes start-up, so the figures use the later epochs
when there are several. The final line holds every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ray  # noqa: E402

from pipeline.config import FinetuneConfig, ScratchConfig, TrainTopConfig  # noqa: E402
from pipeline.trainjobs import finetune, train_scratch, train_top  # noqa: E402


def measure(name: str, fn, cfg) -> dict[str, float]:
    summary = fn(cfg)
    with open(os.path.join(os.path.dirname(summary["model"]), "metrics.csv")) as f:
        rows = f.read().splitlines()[1:]
    samples = sum(int(r.split(",")[5]) for r in rows)
    result = {"samples_per_s": summary["images_per_s"], "seconds_per_epoch": round(summary["seconds"] / summary["epochs"], 1),
              "samples_per_epoch": samples // max(1, len(rows))}
    print(f"{name:<24} {result['samples_per_s']:>10.1f} samples/s  {result['seconds_per_epoch']:>8.1f} s/epoch", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features-dir", required=True, help="output of jobs.extract_features")
    parser.add_argument("--top-model", required=True, help="model.keras of jobs.train_top (fine-tuning starts there)")
    parser.add_argument("--data-dir", default=None, help="image data root (default: the top model's)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            figures[f"top_{workers}w"] = measure(f"top MLP, {workers} worker(s)", train_top, TrainTopConfig(
                features_dir=args.features_dir, output_dir=os.path.join(tmp, f"top{workers}"), epochs=args.epochs,
                num_workers=workers))
        for workers in (1, 2):
            figures[f"finetune_{workers}w"] = measure(f"fine-tuning, {workers} worker(s)", finetune, FinetuneConfig(
                top_model=args.top_model, data_dir=args.data_dir, output_dir=os.path.join(tmp, f"ft{workers}"),
                epochs=args.epochs, num_workers=workers))
        figures["scratch_1w"] = measure("small CNN, 1 worker", train_scratch, ScratchConfig(
            data_dir=args.data_dir or json.load(open(os.path.join(args.features_dir, "manifest.json")))["data_dir"],
            output_dir=os.path.join(tmp, "scratch"), epochs=args.epochs))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
