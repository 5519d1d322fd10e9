"""Accuracy of the three models on real photos, over several seeds, against the goals and the
reference article.

    python bench/accuracy.py [--data-dir ../shared/data/cats_vs_dogs_small] [--num-workers 1]
                             [--seeds 0 1 2] [--skip finetune_streamed]

Extracts the photos once (with the block-4 cache, as run_all does; a finished extraction in the
output folder is reused: it does not depend on the seed), then, for each seed, trains fresh models
with every job's default settings (the default worker count too: 1, 2 and 4 workers train the
same weights, tests/test_worker_count.py), as ``python -m jobs.run_all --data-dir DIR --seed N``
would: top MLP, fine-tuned VGG16 (on the cached block-4 outputs, the default), small CNN; plus
fine-tuning on streamed images (``--no-cache-block4``), the costliest, which ``--skip
finetune_streamed`` leaves out. The small CNN needs no extraction: ``--skip
top,finetune,finetune_streamed`` runs it alone. Models are always retrained (``overwrite``), so a
figure never comes from an earlier code version's model.

Each model gets two figures per seed: the last epoch's validation accuracy (nothing chose it) and
the best epoch's (the exported checkpoint, chosen on the same 800 photos, so it flatters). The
goals are met by the mean over seeds of the last epoch's figure. Prints one row per model and a
JSON line, and writes ``bench/results/accuracy.json`` (date, CPU, commit, command): per model, the
per-seed last- and best-epoch accuracies, their mean ± sd, the epochs and the job's settings, with
the seeds, the worker count and the extraction's image size and precision. A run that leaves
models out (``--skip``) writes ``bench/results/accuracy-<models>.json`` instead, so it never
replaces a full run's file.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.result_file import write_result  # noqa: E402
from pipeline.batch.cluster import init_ray  # noqa: E402
from pipeline.batch.extract import run_extraction  # noqa: E402
from pipeline.config import ExtractConfig, FinetuneConfig, ScratchConfig, TrainTopConfig  # noqa: E402
from pipeline.training.finetune import finetune  # noqa: E402
from pipeline.training.kinds import KINDS  # noqa: E402
from pipeline.training.scratch import train_scratch  # noqa: E402
from pipeline.training.top import train_top  # noqa: E402

MODELS = ("top", "finetune", "finetune_streamed", "scratch")
# Issue 15's goals on cats_vs_dogs_small, met by the mean of the last epoch's accuracy.
GOALS = {"top": 0.975, "finetune": 0.980, "scratch": 0.83}


def train_seed(model: str, seed: int, features_dir: str, data_dir: str, run_dir: str, workers: int) -> dict:
    """Train ``model`` afresh with default settings and ``seed`` into ``run_dir``; its summary."""
    common = dict(output_dir=run_dir, num_workers=workers, seed=seed, overwrite=True)
    top_model = os.path.join(run_dir, "top", "model.keras")
    if model == "top":
        return train_top(TrainTopConfig(features_dir=features_dir, **common))
    if model == "finetune":
        return finetune(FinetuneConfig(top_model=top_model, **common))
    if model == "finetune_streamed":
        return finetune(FinetuneConfig(top_model=top_model, data_dir=data_dir, cache_block4=False, **common))
    return train_scratch(ScratchConfig(data_dir=data_dir, **common))


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), minimum and maximum."""
    return {"mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4)}


def trained_precision(summary: dict) -> str | None:
    """The precision the job's last epoch trained in (``auto`` resolved by the workers), from the
    metrics.csv beside its model: the summary's settings hold only what was asked."""
    path = os.path.join(os.path.dirname(summary["model"]), "metrics.csv")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return rows[-1].get("precision") if rows else None


def figures(summaries: dict[str, list[dict]]) -> dict:
    """Per model: last- and best-epoch accuracy per seed and over the seeds, minutes, whether its goal
    is met, and the settings the job ran with (its summary's, less the seed: every seed's are the same)."""
    out = {}
    for model, runs in summaries.items():
        last = spread([r["last_epoch_accuracy"] for r in runs])
        goal = GOALS.get(model)
        out[model] = {"last_epoch": last, "best_epoch": spread([r["accuracy"] for r in runs]),
                      "per_seed_last": [r["last_epoch_accuracy"] for r in runs],
                      "per_seed_best": [r["accuracy"] for r in runs],
                      "per_seed_best_epoch": [r["best_epoch"] for r in runs],
                      "per_seed_minutes": [round(r["wall_s"] / 60, 1) for r in runs],
                      "epochs": runs[0]["epochs"],
                      "minutes": round(statistics.fmean(r["wall_s"] for r in runs) / 60, 1),
                      "goal": goal, "meets_goal": None if goal is None else last["mean"] >= goal,
                      "trained_precision": trained_precision(runs[0]),
                      "settings": {k: v for k, v in runs[0].get("settings", {}).items() if k != "seed"}}
    if "finetune" in out and "top" in out:
        above = out["finetune"]["last_epoch"]["mean"] > out["top"]["last_epoch"]["mean"]
        out["finetune"]["above_top"] = above
        out["finetune"]["meets_goal"] = out["finetune"]["meets_goal"] and above
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "cats_vs_dogs_small"))
    parser.add_argument("--num-workers", type=int, default=TrainTopConfig.__dataclass_fields__["num_workers"].default)
    parser.add_argument("--output-dir", default=os.path.join("outputs", "accuracy"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip", default="", help=f"comma-separated models to leave out, of {', '.join(MODELS)}")
    args = parser.parse_args()
    skipped = {m.strip() for m in args.skip.split(",") if m.strip()}
    if skipped - set(MODELS):
        parser.error(f"--skip takes {', '.join(MODELS)}; got {args.skip!r}")
    if "top" in skipped and not {"finetune", "finetune_streamed"} <= skipped:
        parser.error("fine-tuning starts from the top MLP: --skip top needs --skip finetune,finetune_streamed too")
    init_ray()
    features_dir = os.path.join(args.output_dir, "features")
    extraction = {}
    if "top" not in skipped:
        manifest = run_extraction(ExtractConfig(data_dir=args.data_dir, output_dir=features_dir, cache_block4=True))
        extraction = {k: manifest.get(k) for k in ("image_size", "precision", "weights", "counts", "num_rejects")}
    summaries: dict[str, list[dict]] = {m: [] for m in MODELS if m not in skipped}
    for seed in args.seeds:
        for model in summaries:
            run_dir = os.path.join(args.output_dir, f"seed{seed}")
            summaries[model].append(train_seed(model, seed, features_dir, args.data_dir, run_dir, args.num_workers))
    result = {"seeds": args.seeds, "num_workers": args.num_workers, "data_dir": args.data_dir,
              "extraction": extraction, "models": figures(summaries)}
    print(f"{'model':<16} {'last epoch (mean ± sd)':>24} {'best epoch':>11} {'goal':>6} {'met':>5} "
          f"{'reference':>10} {'epochs':>6} {'minutes':>7}")
    for model, f in result["models"].items():
        last = f"{f['last_epoch']['mean']:.4f} ± {f['last_epoch']['sd']:.4f}"
        print(f"{model:<16} {last:>24} {f['best_epoch']['mean']:>11.4f} {str(f['goal'] or '–'):>6} "
              f"{str(f['meets_goal'] if f['goal'] else '–'):>5} {KINDS[model].reference:>10} "
              f"{f['epochs']:>6} {f['minutes']:>7}")
    # A run of some models is another kind of result: it must not replace the full run's file.
    write_result("accuracy" if not skipped else f"accuracy-{'-'.join(result['models'])}", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
