"""Accuracy of the three models on real photos against the seed's published figures.

    python bench/accuracy.py [--data-dir ../shared/data/cats_vs_dogs_small] [--num-workers 2] [--skip scratch]

Runs the main job (`jobs.run_all`, default settings; finished stages in the output folder are
reused), then fine-tuning on cached block-4 outputs (`jobs.finetune --cache-block4`, which adds
the cache to the run's feature folder), and prints one row per model: validation accuracy, the
seed's figure, epochs, minutes. Targets on cats_vs_dogs_small: bottleneck >= 0.95, fine-tuned
>= 0.96, scratch >= 0.80, and cached fine-tuning within 1 point of streamed fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline.cluster import init_ray  # noqa: E402
from pipeline.config import ExtractConfig, FinetuneConfig, RunAllConfig  # noqa: E402
from pipeline.extract import run_extraction, run_name  # noqa: E402
from pipeline.report import SEED_FIGURES  # noqa: E402
from pipeline.runall import run_all  # noqa: E402
from pipeline.trainjobs import finetune  # noqa: E402

TARGETS = {"top": 0.95, "finetune": 0.96, "scratch": 0.80}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "cats_vs_dogs_small"))
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--skip", default="", help="stages of run_all to skip (finetune, scratch), as in jobs.run_all")
    args = parser.parse_args()
    init_ray()
    run_dir = args.output_dir or os.path.join("outputs", run_name(args.data_dir))
    # Extracting with the block-4 cache first: run_all reuses it, and cached fine-tuning needs no second pass.
    run_extraction(ExtractConfig(data_dir=args.data_dir, output_dir=os.path.join(run_dir, "features"), cache_block4=True))
    run_all(RunAllConfig(data_dir=args.data_dir, num_workers=args.num_workers, output_dir=run_dir, skip=args.skip))
    finetune(FinetuneConfig(top_model=os.path.join(run_dir, "top", "model.keras"), output_dir=run_dir,
                            cache_block4=True, num_workers=args.num_workers))
    summaries = {}
    for job in ("top", "finetune", "finetune_cached", "scratch"):
        if os.path.exists(os.path.join(run_dir, job, "summary.json")):
            with open(os.path.join(run_dir, job, "summary.json")) as f:
                summaries[job] = json.load(f)
    streamed = summaries.get("finetune", {}).get("accuracy")
    targets = {**TARGETS, "finetune_cached": round(streamed - 0.01, 4) if streamed is not None else None}
    print(f"{'model':<16} {'val accuracy':>12} {'seed':>10} {'target':>7} {'epochs':>7} {'minutes':>8}")
    figures = {}
    for job, s in summaries.items():
        target = targets[job]
        figures[job] = {"accuracy": s["accuracy"], "epochs": s["epochs"], "minutes": round(s["seconds"] / 60, 1),
                        "target": target, "meets_target": None if target is None else s["accuracy"] >= target}
        print(f"{job:<16} {s['accuracy']:>12.4f} {SEED_FIGURES[s['kind']]:>10} {str(target):>7} {s['epochs']:>7} "
              f"{s['seconds'] / 60:>8.1f}")
    if streamed is not None:
        figures["cached_minus_streamed_points"] = round((summaries["finetune_cached"]["accuracy"] - streamed) * 100, 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
