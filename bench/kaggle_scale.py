"""Kaggle-size on one node: the full Dogs vs. Cats training set's size (25,000 photos) through
extraction, the top MLP and cached fine-tuning with 2 workers, to the end, on this machine.

    python bench/kaggle_scale.py [--photos 25000] [--num-workers 2] [--top-epochs 50]
                                 [--finetune-epochs 10] [--scratch-epochs 2]
                                 [--stages extract,top,finetune,scratch] [--no-cache-block4]
                                 [--name RESULT]

The root is Kaggle's layout (one flat folder of ``cat.<n>.jpg`` and ``dog.<n>.jpg``), made of the
shared sample's photos copied round robin under new names (copies, not links: listing counts a
file that several links reach once). Each stage runs as a user runs it (its own local Ray
cluster, the job's defaults, ``--num-workers``); printed per stage: wall time, the peak RSS of
each kind of process of its tree, and the training workers' peaks from the job's summary. The
small CNN runs ``--scratch-epochs`` epochs, the top MLP and fine-tuning ``--top-epochs`` and
``--finetune-epochs`` (their defaults unless given); a stage run with fewer epochs than its
default gets the default projected from its per-epoch seconds. ``--stages`` runs some stages over
the work folder an earlier run left (a run with ``extract``, or over a folder no run finished a stage
in, starts it afresh, and refuses a folder holding anything this bench does not write), so an
hours-long run can be taken in parts, and ``--stages scratch`` (images, no features) alone;
each stage's figures carry the command and commit that made them. A training stage stopped part
way (killed, or the machine gone) resumes from its last checkpoint when run again: its figures are
then those of the last part (process peaks included), with ``resumed_after_epoch`` and
``uninterrupted_s``, the seconds of a run that was not stopped (``epoch_seconds``). ``--no-cache-block4`` extracts
without the block-4 cache (half the VGG16 passes) for a run of the top MLP alone. Figures go to
``bench/results/kaggle_scale.json``, or ``--name``'s file.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.result_file import commit, write_result  # noqa: E402
from bench.train_memory import job_figures  # noqa: E402
from pipeline.config import FinetuneConfig, ScratchConfig, TrainTopConfig  # noqa: E402
from pipeline.data.discover import discover  # noqa: E402
from pipeline.training.checkpoints import STATE_FILE  # noqa: E402

DEFAULT_EPOCHS = {"top": TrainTopConfig.__dataclass_fields__["epochs"].default,
                  "finetune": FinetuneConfig.__dataclass_fields__["epochs"].default,
                  "scratch": ScratchConfig.__dataclass_fields__["epochs"].default}
STAGES = ("extract", "top", "finetune", "scratch")


def kaggle_root(source: str, root: str, photos: int) -> dict[str, int]:
    """``photos`` copies of the sample's photos in one flat folder, named as Kaggle names them."""
    by_label: dict[str, list[dict]] = {}
    for row in discover(source).rows():
        by_label.setdefault("cat" if row["class_name"].startswith("cat") else "dog", []).append(row)
    # cat, dog, cat, dog, ...: so that any number of photos has both classes
    interleaved = [pair for pairs in zip(*([(label, r) for r in rows] for label, rows in by_label.items()))
                   for pair in pairs]
    os.makedirs(root)
    made: dict[str, int] = {}
    for i in range(photos):
        label, row = interleaved[i % len(interleaved)]
        made[label] = made.get(label, 0) + 1
        shutil.copyfile(row["path"], os.path.join(root, f"{label}.{made[label] - 1}.jpg"))
    return made


def stage(name: str, args: list[str], summary: str | None, logs: str) -> dict:
    """Run one stage: ``train_memory``'s figures (seconds, process peaks, the training workers'
    memory by epoch against the hold-or-stream rule) with the command, the commit, and for a
    training stage its epochs' seconds: an uninterrupted run's seconds when an earlier part was
    stopped (the job resumes from its checkpoint), and the default's projected seconds when fewer
    epochs than its default ran."""
    done_before = checkpointed_epochs(summary)
    figures = {"command": "python -m " + " ".join(args), "commit": commit(), **job_figures(name, args, summary, logs)}
    if summary is not None:
        figures.update(epoch_seconds(name, figures["seconds"], summary, done_before))
        print(f"{name}, epochs: {json.dumps(figures)}", flush=True)
    return figures


def checkpointed_epochs(summary: str | None) -> int:
    """The epochs a stopped run of the stage has checkpointed (0: none), after which its job resumes."""
    if summary is None or os.path.exists(summary):
        return 0
    states = glob.glob(os.path.join(os.path.dirname(summary), "ray_train", "run", "checkpoint_*", STATE_FILE))
    epochs = [0]
    for path in states:
        with open(path) as f:
            epochs.append(json.load(f)["epoch"])
    return max(epochs)


def epoch_seconds(name: str, seconds: float, summary: str, done_before: int) -> dict:
    """A training stage's time by epoch (its metrics.csv). This part's start-up and end (``fixed_s``) is its
    seconds less those of the epochs it ran itself, the ones after ``done_before``; a run in parts
    (``resumed_after_epoch``) is given ``uninterrupted_s``, that start-up plus every epoch's seconds, since
    the part stopped lost its unfinished epoch. With fewer epochs than the default: the default projected
    from the mean epoch (the first pays for tracing)."""
    with open(os.path.join(os.path.dirname(summary), "metrics.csv")) as f:
        epochs = [float(r["seconds"]) for r in csv.DictReader(f)]
    fixed = seconds - sum(epochs[done_before:])
    figures: dict = {"fixed_s": round(fixed), "epochs_s": round(sum(epochs))}
    if done_before:
        figures.update(resumed_after_epoch=done_before, uninterrupted_s=round(fixed + sum(epochs)))
    default = DEFAULT_EPOCHS[name]
    if len(epochs) < default:
        per_epoch = sum(epochs[1:] or epochs) / len(epochs[1:] or epochs)
        figures.update({"per_epoch_s": round(per_epoch, 1),
                        f"projected_{default}_epochs_s": round(fixed + epochs[0] + per_epoch * (default - 1))})
    return figures


def stage_args(name: str, work: str, args: argparse.Namespace) -> tuple[list[str], str | None]:
    """A stage's job command line (the job's defaults, the bench's worker and epoch counts) and
    the summary it writes."""
    root, out = os.path.join(work, "train"), os.path.join(work, "out")
    features = os.path.join(out, "features")
    workers = ["--num-workers", str(args.num_workers)]
    if name == "extract":
        cache = ["--cache-block4"] if args.cache_block4 else []
        return ["jobs.extract_features", "--data-dir", root, "--layout", "kaggle", "--output-dir", features,
                *cache], None
    epochs = {"top": args.top_epochs, "finetune": args.finetune_epochs}.get(name)
    epochs_arg = ["--epochs", str(epochs)] if epochs else []
    if name == "top":
        return ["jobs.train_top", "--features-dir", features, "--output-dir", out, *workers, *epochs_arg], \
            os.path.join(out, "top", "summary.json")
    if name == "finetune":
        return ["jobs.finetune", "--top-model", os.path.join(out, "top", "model.keras"), "--output-dir", out,
                *workers, *epochs_arg], os.path.join(out, "finetune", "summary.json")
    return ["jobs.train_scratch", "--data-dir", root, "--layout", "kaggle", "--output-dir", out,
            "--epochs", str(args.scratch_epochs), *workers], os.path.join(out, "scratch", "summary.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "cats_vs_dogs_small"))
    parser.add_argument("--photos", type=int, default=25_000)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--top-epochs", type=int, default=None, help="default: the job's")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: the job's")
    parser.add_argument("--scratch-epochs", type=int, default=2)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"some of {', '.join(STAGES)}")
    parser.add_argument("--work-dir", default="/tmp/ric-kaggle")
    parser.add_argument("--no-cache-block4", dest="cache_block4", action="store_false",
                        help="extract without the block-4 cache (half the VGG16 passes; no fine-tuning stage then)")
    parser.add_argument("--name", default=None,
                        help="the result file, bench/results/<name>.json (default: kaggle_scale, or "
                             "kaggle_scale-<photos> for fewer than 25,000)")
    args = parser.parse_args()
    stages = args.stages.split(",")
    if not stages or not set(stages) <= set(STAGES):
        parser.error(f"--stages takes some of {', '.join(STAGES)}, got {args.stages!r}")
    if not args.cache_block4 and "finetune" in stages:
        parser.error("--no-cache-block4 leaves fine-tuning without its cache: leave finetune out of --stages")
    work = args.work_dir
    state = os.path.join(work, "figures.json")
    if "extract" in stages or not os.path.exists(state):
        # A fresh run deletes the folder an earlier run left, and nothing else: not a folder a user named.
        foreign = set(os.listdir(work)) - {"train", "out", "logs", "figures.json"} if os.path.isdir(work) else set()
        if foreign:
            parser.error(f"--work-dir {work} holds {sorted(foreign)[:3]}, which this bench never writes; "
                         "name an empty or new folder")
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(os.path.join(work, "logs"))
        figures: dict = {"photos": kaggle_root(os.path.abspath(args.data_dir), os.path.join(work, "train"),
                                               args.photos), "num_workers": args.num_workers}
    else:
        with open(state) as f:
            figures = json.load(f)
    try:
        for name in (s for s in STAGES if s in stages):
            job, summary = stage_args(name, work, args)
            figures[name] = stage(name, job, summary, os.path.join(work, "logs"))
            with open(state, "w") as f:
                json.dump(figures, f)
    finally:
        photos = sum(figures["photos"].values())
        write_result(args.name or ("kaggle_scale" if photos >= 25_000 else f"kaggle_scale-{photos}"), figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
