"""Training memory at each model's defaults: what a training worker takes, against the data it holds.

    python bench/train_memory.py [--data-dir ../shared/data/cats_vs_dogs_small] [--num-workers 2] [--epochs 2]
        [--jobs top,finetune,scratch] [--hold-data auto] [--keep-features] [--name train_memory]

Extracts the data set's features with the block-4 cache (the product's defaults otherwise), then
runs the three training jobs as a user does (each on its own local Ray cluster, ``--num-workers``
workers, the job's defaults but ``--epochs``: a worker's memory is reached within its first two
epochs and does not grow after them, which the per-epoch peaks in each summary show). For each
job it prints, per worker: its private memory (``pipeline.training.memory``: its own pages, not
the object store's or the libraries' it shares) before reading data and at its peak, the same for
its resident memory (shared pages included), by epoch, the bytes of data it held (0: streamed),
and whether the private peak is within the footprint the hold-or-stream rule assumes
(``pipeline.training.batches.worker_footprint``: the kind's fixed part + HELD_BYTES_FACTOR x held);
also the peak of each kind of process of the job's tree. The figures go to
``bench/results/train_memory.json`` (date, CPU, commit, command).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.process_memory import run_sampled  # noqa: E402
from bench.result_file import write_result  # noqa: E402
from pipeline.training.batches import HELD_BYTES_FACTOR, worker_footprint  # noqa: E402
from pipeline.training.kinds import KINDS  # noqa: E402

GIB = 2**30


def job_figures(name: str, args: list[str], summary_path: str, logs: str) -> dict:
    """Run one job; its workers' memory against the rule, and its tree's peaks by process kind."""
    seconds, sampler = run_sampled(args, REPO, os.path.join(logs, f"{name}.log"))
    figures: dict = {"seconds": round(seconds), "process_peaks_mib": sampler.peaks()}
    if summary_path:
        with open(summary_path) as f:
            summary = json.load(f)
        held = summary.get("held_bytes_per_worker", 0)
        peaks, bases = summary["worker_peak_private_bytes"], summary["worker_base_private_bytes"]
        figures.update({"held_gib_per_worker": round(held / GIB, 3)})
        for kind in ("private", "rss"):
            figures.update({
                f"worker_base_{kind}_gib": _gib(summary[f"worker_base_{kind}_bytes"]),
                f"worker_peak_{kind}_gib": _gib(summary[f"worker_peak_{kind}_bytes"]),
                f"worker_peak_{kind}_gib_by_epoch": [_gib(e) for e in
                                                     summary_per_epoch(summary_path, f"worker_peak_{kind}_bytes")]})
        figures.update({
            # The jobs run in their default modes: fine-tuning on the block-4 cache, KINDS["finetune"].
            "worker_fixed_gib_rule": KINDS[name].worker_fixed_gib,
            "footprint_rule_gib": round(worker_footprint(KINDS[name], held) / GIB, 3),
            "within_rule": all(p <= worker_footprint(KINDS[name], held) for p in peaks),
            "private_peak_minus_base_over_held": [round((p - b) / held, 2) for p, b in zip(peaks, bases)] if held else None,
            "accuracy": summary["accuracy"], "epochs": summary["epochs"]})
    print(f"{name}: {json.dumps(figures)}", flush=True)
    return figures


def _gib(values: list[int]) -> list[float]:
    return [round(v / GIB, 3) for v in values]


def summary_per_epoch(summary_path: str, field: str) -> list[list[int]]:
    """Each epoch's worker peaks (``field``), from the job's metrics.csv beside its summary (one row per
    epoch; the peaks by rank are a list written as Python prints it)."""
    with open(os.path.join(os.path.dirname(summary_path), "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return [json.loads(r[field].replace("'", '"')) for r in rows if r.get(field)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "cats_vs_dogs_small"))
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work-dir", default="/tmp/ric-train-memory")
    parser.add_argument("--jobs", default="top,finetune,scratch")
    parser.add_argument("--keep-features", action="store_true",
                        help="keep <work-dir>/features: a finished extraction with the same settings is reused")
    parser.add_argument("--hold-data", default="auto", choices=("auto", "always", "never"),
                        help="the training jobs' --hold-data: never measures streaming workers")
    parser.add_argument("--name", default="train_memory", help="the result file: bench/results/<name>.json")
    args = parser.parse_args()
    data, work = os.path.abspath(args.data_dir), args.work_dir
    for entry in os.listdir(work) if os.path.isdir(work) else []:
        if not (args.keep_features and entry in ("features", "features.lock")):
            path = os.path.join(work, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    common = ["--output-dir", work, "--num-workers", str(args.num_workers), "--epochs", str(args.epochs),
              "--hold-data", args.hold_data]
    figures: dict = {"num_workers": args.num_workers, "epochs": args.epochs, "hold_data": args.hold_data,
                     "held_bytes_factor_rule": HELD_BYTES_FACTOR}
    figures["extract"] = job_figures("extract", ["jobs.extract_features", "--data-dir", data, "--output-dir",
                                                 os.path.join(work, "features"), "--cache-block4"], "", logs)
    if "top" in args.jobs:
        figures["top"] = job_figures("top", ["jobs.train_top", "--features-dir", os.path.join(work, "features"),
                                             *common], os.path.join(work, "top", "summary.json"), logs)
    if "finetune" in args.jobs:
        figures["finetune"] = job_figures("finetune", ["jobs.finetune", "--top-model",
                                                       os.path.join(work, "top", "model.keras"), *common],
                                          os.path.join(work, "finetune", "summary.json"), logs)
    if "scratch" in args.jobs:
        figures["scratch"] = job_figures("scratch", ["jobs.train_scratch", "--data-dir", data, *common],
                                         os.path.join(work, "scratch", "summary.json"), logs)
    write_result(args.name, figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
