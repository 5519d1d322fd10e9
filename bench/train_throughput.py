"""Training throughput: samples/s of the top MLP and of fine-tuning with 1 and 2 Ray Train
workers, fine-tuning streamed (images through blocks 1-5 every epoch) and cached (block 5 + top
on the block-4 outputs cached by the extraction), and seconds per epoch of each model.

    python bench/train_throughput.py --features-dir outputs/cats_vs_dogs_small/features \
        --top-model outputs/cats_vs_dogs_small/top/model.keras [--epochs 2]

Each configuration is a real Ray Train run (TensorflowTrainer, MultiWorkerMirroredStrategy)
on a local Ray cluster. The first epoch includes start-up (graph tracing, pipeline warm-up),
so with several epochs the figures come from the later ones. Cached fine-tuning adds the
block-4 cache to the top model's feature folder first if it has none (a one-off extraction,
not counted). Every job runs at its defaults but ``--epochs`` and the worker count (the top
model and its features carry their own image size, recorded with the figures). Target: cached
fine-tuning >= 5x faster per epoch than streamed. The final line holds every figure; they also
go to ``bench/results/train_throughput.json`` (date, CPU, commit, command).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ray  # noqa: E402

from bench.result_file import write_result  # noqa: E402
from pipeline.config import ExtractConfig, FinetuneConfig, ScratchConfig, TrainTopConfig  # noqa: E402
from pipeline.nets.modelfile import read_metadata  # noqa: E402
from pipeline.training.finetune import ensure_block4_cache, finetune  # noqa: E402
from pipeline.training.scratch import train_scratch  # noqa: E402
from pipeline.training.top import train_top  # noqa: E402


def measure(name: str, fn, cfg) -> dict[str, float]:
    summary = fn(cfg)
    with open(os.path.join(os.path.dirname(summary["model"]), "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    steady = rows[1:] or rows  # the first epoch pays for tracing and warm-up
    seconds = sum(float(r["seconds"]) for r in steady)
    samples = sum(int(r["train_samples"]) for r in steady)
    result = {"samples_per_s": round(samples / seconds, 1), "seconds_per_epoch": round(seconds / len(steady), 1),
              "first_epoch_seconds": float(rows[0]["seconds"]), "samples_per_epoch": samples // len(steady),
              # What shaped the run: the job's batch, and the precision its workers resolved "auto" to.
              "num_workers": cfg.num_workers, "batch_size": cfg.batch_size, "precision": rows[-1].get("precision")}
    print(f"{name:<34} {result['samples_per_s']:>8.1f} samples/s {result['seconds_per_epoch']:>8.1f} s/epoch "
          f"(first epoch {result['first_epoch_seconds']:.1f} s)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features-dir", required=True, help="output of jobs.extract_features")
    parser.add_argument("--top-model", required=True, help="model.keras of jobs.train_top (fine-tuning starts there)")
    parser.add_argument("--data-dir", default=None, help="image data root (default: the top model's)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    ray.init(include_dashboard=True, configure_logging=False, log_to_driver=False)
    top = read_metadata(args.top_model)
    figures: dict[str, object] = {"cpu_cores": os.cpu_count(), "epochs": args.epochs,
                                  "features_dir": args.features_dir, "top_model": args.top_model,
                                  "data_dir": args.data_dir or top["data_dir"], "image_size": top.get("image_size"),
                                  "scratch_image_size": ScratchConfig.__dataclass_fields__["image_size"].default}
    if top.get("image_size") != ExtractConfig.__dataclass_fields__["image_size"].default:
        print(f"note: the top model is at {top.get('image_size')} px, not extraction's default "
              f"{ExtractConfig.__dataclass_fields__['image_size'].default}: fine-tuning is measured at its size")
    # Built before any timing, so the one-off cache extraction is not in the figures.
    ensure_block4_cache(top["features_dir"])
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            figures[f"top_{workers}w"] = measure(f"top MLP, {workers} worker(s)", train_top, TrainTopConfig(
                features_dir=args.features_dir, output_dir=os.path.join(tmp, f"top{workers}"), epochs=args.epochs,
                num_workers=workers))
        for workers in (1, 2):
            for cached in (False, True):
                mode = "cached" if cached else "streamed"
                figures[f"finetune_{mode}_{workers}w"] = measure(
                    f"fine-tuning {mode}, {workers} worker(s)", finetune, FinetuneConfig(
                        top_model=args.top_model, data_dir=None if cached else args.data_dir, cache_block4=cached,
                        output_dir=os.path.join(tmp, f"ft{workers}"), epochs=args.epochs, num_workers=workers))
        figures["scratch_1w"] = measure("small CNN, 1 worker", train_scratch, ScratchConfig(
            data_dir=args.data_dir or top["data_dir"],
            output_dir=os.path.join(tmp, "scratch"), epochs=args.epochs))
    for workers in (1, 2):
        streamed = figures[f"finetune_streamed_{workers}w"]["seconds_per_epoch"]
        cached = figures[f"finetune_cached_{workers}w"]["seconds_per_epoch"]
        figures[f"cached_speedup_{workers}w"] = round(streamed / cached, 2)
        print(f"cached fine-tuning, {workers} worker(s): {streamed / cached:.2f}x faster per epoch than streamed "
              f"(target >= 5)")
    write_result("train_throughput", figures)
    print(json.dumps(figures))  # last: the line that holds every figure


if __name__ == "__main__":
    main()
