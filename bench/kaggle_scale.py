"""Kaggle-size on one node: the full Dogs vs. Cats training set's size (25,000 photos) through
extraction, the top MLP and cached fine-tuning with 2 workers, to the end, on this machine.

    python bench/kaggle_scale.py [--photos 25000] [--num-workers 2] [--scratch-epochs 2]

The root is Kaggle's layout (one flat folder of ``cat.<n>.jpg`` and ``dog.<n>.jpg``), made of the
shared sample's photos copied round robin under new names (copies, not links: listing counts a
file that several links reach once). Each stage runs as a user runs it (its own local Ray
cluster, the job's defaults, ``--num-workers``); printed per stage: wall time, the peak RSS of
each kind of process of its tree, and the training workers' peaks from the job's summary. The
small CNN runs ``--scratch-epochs`` epochs and its 100 (the default) are projected from its
per-epoch seconds. Figures go to ``bench/results/kaggle_scale.json``.
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
from pipeline.config import ScratchConfig  # noqa: E402
from pipeline.data.discover import discover  # noqa: E402

GIB = 2**30
SCRATCH_EPOCHS = ScratchConfig.__dataclass_fields__["epochs"].default


def kaggle_root(source: str, root: str, photos: int) -> dict[str, int]:
    """``photos`` copies of the sample's photos in one flat folder, named as Kaggle names them."""
    rows = discover(source).rows()
    os.makedirs(root)
    made = {}
    for i in range(photos):
        row = rows[i % len(rows)]
        label = "cat" if row["class_name"].startswith("cat") else "dog"
        made[label] = made.get(label, 0) + 1
        shutil.copyfile(row["path"], os.path.join(root, f"{label}.{made[label] - 1}.jpg"))
    return made


def stage(name: str, args: list[str], summary: str | None, logs: str) -> dict:
    """Run one stage; its seconds, process peaks and (training) its workers' memory and accuracy."""
    seconds, sampler = run_sampled(args, REPO, os.path.join(logs, f"{name}.log"), period=2.0)
    figures: dict = {"seconds": round(seconds), "process_peaks_mib": sampler.peaks()}
    if summary:
        with open(summary) as f:
            done = json.load(f)
        figures.update({"worker_peak_gib": [round(b / GIB, 2) for b in done["worker_peak_rss_bytes"]],
                        "held_gib_per_worker": round(done.get("held_bytes_per_worker", 0) / GIB, 2),
                        "epochs": done["epochs"], "epoch_seconds": done["seconds"], "accuracy": done["accuracy"]})
    print(f"{name}: {json.dumps(figures)}", flush=True)
    return figures


def projected_scratch(figures: dict, summary: str) -> dict:
    """The small CNN's default epochs from the epochs run: start-up plus the mean epoch's seconds."""
    with open(os.path.join(os.path.dirname(summary), "metrics.csv")) as f:
        epochs = [float(r["seconds"]) for r in csv.DictReader(f)]
    per_epoch = sum(epochs[1:] or epochs) / len(epochs[1:] or epochs)  # the first pays for tracing
    fixed = figures["seconds"] - sum(epochs)
    return {"per_epoch_s": round(per_epoch, 1), "fixed_s": round(fixed),
            f"projected_{SCRATCH_EPOCHS}_epochs_s": round(fixed + epochs[0] + per_epoch * (SCRATCH_EPOCHS - 1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "cats_vs_dogs_small"))
    parser.add_argument("--photos", type=int, default=25_000)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--scratch-epochs", type=int, default=2)
    parser.add_argument("--work-dir", default="/tmp/ric-kaggle")
    args = parser.parse_args()
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    root, out, logs = os.path.join(work, "train"), os.path.join(work, "out"), os.path.join(work, "logs")
    os.makedirs(logs)
    figures: dict = {"photos": kaggle_root(os.path.abspath(args.data_dir), root, args.photos),
                     "num_workers": args.num_workers}
    workers = ["--num-workers", str(args.num_workers)]
    features = os.path.join(out, "features")
    try:
        figures["extract"] = stage("extract", ["jobs.extract_features", "--data-dir", root, "--layout", "kaggle",
                                               "--output-dir", features, "--cache-block4"], None, logs)
        figures["top"] = stage("top", ["jobs.train_top", "--features-dir", features, "--output-dir", out, *workers],
                               os.path.join(out, "top", "summary.json"), logs)
        figures["finetune"] = stage("finetune", ["jobs.finetune", "--top-model", os.path.join(out, "top", "model.keras"),
                                                 "--output-dir", out, *workers],
                                    os.path.join(out, "finetune", "summary.json"), logs)
        scratch_summary = os.path.join(out, "scratch", "summary.json")
        figures["scratch"] = stage("scratch", ["jobs.train_scratch", "--data-dir", root, "--layout", "kaggle",
                                               "--output-dir", out, "--epochs", str(args.scratch_epochs), *workers],
                                   scratch_summary, logs)
        figures["scratch"].update(projected_scratch(figures["scratch"], scratch_summary))
    finally:
        write_result("kaggle_scale" if args.photos >= 25_000 else f"kaggle_scale-{args.photos}", figures)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
