"""Soak: one extraction over a million real JPEGs on this machine, with flat memory, steady
throughput, an exact audit, and a resume after SIGKILL.

    python bench/soak.py [--files 1000000] [--image-size 32] [--weights none] [--kill-at 0.6]

The data root holds ``--files`` JPEGs: the shared photos decoded once, shrunk to 64 px on the
long side and re-encoded (a real JPEG decode per file, but small, so a million fit the time on
2 cores), written round robin under distinct names into their split/class folders. The job runs
as a user starts it (``python -m jobs.extract_features``, its own local Ray cluster) with a
small ``--image-size`` and ``--weights none`` (the model's work is the same as with weights).

Run 1, to the end: every 2 s the RSS of every process of the job's tree is sampled and each
process is given a kind (driver, raylet, gcs, dashboard, decode tasks, inference actor, other
Ray workers); committed rows are read from the ledger. Printed: each kind's peak RSS (largest
single process, and the kind's sum) in the tenth of the run ending at 10%, 50% and 100%
(flat: the 100% peak within 10% of the 10% one), the throughput of each tenth (the last at
least 0.9 of the second), and the audit: every listed file in exactly one output row or one
reject, none twice.
Run 2, into a new output: SIGKILL of the whole tree once ``--kill-at`` of the files are
committed, then the same command again: printed are the files the rerun processed against those
left uncommitted (the difference is committed work redone) and the same audit.
Figures go to ``bench/results/soak.json`` (date, CPU, commit, command).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.result_file import write_result  # noqa: E402
from bench import process_memory  # noqa: E402
from bench.process_memory import Sampler, committed_rows  # noqa: E402
from pipeline.data.discover import discover  # noqa: E402

SPLITS = ("train", "validation")
# The jobs' logs, kept after the data and outputs are removed.
LOGS = "/tmp/ric-soak-logs"


def small_jpegs(source: str, side: int = 64) -> list[tuple[str, str, bytes]]:
    """(split, class, JPEG bytes) of every photo of ``source``, shrunk to ``side`` px."""
    out = []
    for row in discover(source).rows():
        with Image.open(row["path"]) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
        out.append((row["split"], row["class_name"], buf.getvalue()))
    return out


def build_root(source: str, root: str, files: int) -> dict[str, int]:
    """``files`` JPEGs under ``root``/<split>/<class>/, round robin over the shrunk photos."""
    photos = small_jpegs(source)
    folders = {(s, c) for s, c, _ in photos}
    for s, c in folders:
        os.makedirs(os.path.join(root, s, c), exist_ok=True)
    total_bytes = 0
    for i in range(files):
        split, cls, data = photos[i % len(photos)]
        with open(os.path.join(root, split, cls, f"{i:08d}.jpg"), "wb") as f:
            f.write(data)
        total_bytes += len(data)
    return {"files": files, "distinct_photos": len(photos), "mean_file_bytes": round(total_bytes / files)}


def start_job(root: str, out: str, log_path: str, extra: list[str]) -> subprocess.Popen:
    """The extraction job over ``root`` into ``out`` (``process_memory.start_job``)."""
    return process_memory.start_job(["jobs.extract_features", "--data-dir", root, "--output-dir", out, *extra],
                                    REPO, log_path)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (Ray's too), as a machine loss would."""
    tree = []
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for p in [*tree]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


def tenth_figures(samples: list, total: int, started: float) -> dict:
    """Throughput per tenth of the files and each kind's peaks in the tenths ending at 10/50/100%."""
    bounds = [started]
    for t, done, _ in samples:
        while len(bounds) <= 10 and done >= total * len(bounds) / 10:
            bounds.append(t)
    while len(bounds) <= 10:  # the last rows committed after the last sample
        bounds.append(samples[-1][0])
    rate = [round(total / 10 / max(b - a, 1e-9), 1) for a, b in zip(bounds, bounds[1:])]
    peaks: dict[str, dict] = {}
    for label, tenth in (("10%", 0), ("50%", 4), ("100%", 9)):
        times = [s[0] for s in samples if min(9, s[1] * 10 // total) == tenth]
        # A short run may have no sample in a tenth: then nothing is said of it.
        peaks[label] = {**(Sampler.peaks_of(samples, min(times), max(times)) if times else {}), "samples": len(times)}
    return {"images_per_s_by_tenth": rate, "peaks": peaks,
            "last_over_second_tenth": round(rate[9] / rate[1], 3)}


def load_by_tenth(sampler: Sampler, total: int) -> list[float | None]:
    """The mean 1-minute load average in each tenth of the files: above 2 (the cores), others shared them."""
    tenths: list[list[float]] = [[] for _ in range(10)]
    for (_, done, _), load in zip(sampler.samples, sampler.load):
        tenths[min(9, done * 10 // total)].append(load)
    return [round(sum(t) / len(t), 1) if t else None for t in tenths]


def flatness(peaks: dict) -> dict:
    """Each kind's sum at 100% over its sum at 10% (flat: <= 1.10)."""
    first, last = peaks["10%"], peaks["100%"]
    if not first["samples"] or not last["samples"]:
        return {}
    out = {kind: round(last[kind]["kind_sum_mib"] / max(first[kind]["kind_sum_mib"], 1), 3)
           for kind in first if kind in last and isinstance(first[kind], dict) and "kind_sum_mib" in first[kind]}
    out["whole_tree"] = round(last["whole_tree"]["sum_mib"] / max(first["whole_tree"]["sum_mib"], 1), 3)
    return out


def audit(root: str, out: str) -> dict:
    """Every listed file in exactly one output row or reject; nothing else, nothing twice."""
    files = discover(root).files
    listed = set(zip(files.column("split").to_pylist(), files.column("relpath").to_pylist()))
    rows: list[tuple[str, str]] = []
    for split in SPLITS:
        table = pq.read_table(os.path.join(out, split), columns=["path"])
        rows += [(split, p) for p in table.column("path").to_pylist()]
    rejects = pq.read_table(os.path.join(out, "rejects.parquet"))
    rows += list(zip(rejects.column("split").to_pylist(), rejects.column("path").to_pylist()))
    counts = collections.Counter(rows)
    return {"listed": len(listed), "rows_and_rejects": len(rows), "rejects": rejects.num_rows,
            "twice": sum(1 for c in counts.values() if c > 1), "missing": len(listed - set(counts)),
            "not_listed": len(set(counts) - listed),
            "exact": len(rows) == len(listed) and set(counts) == listed}


def output_sizes(out: str) -> dict:
    """What the output holds: the folded ledger's bytes, and the data parts' count and bytes."""
    parts = [os.path.join(out, split, n) for split in SPLITS for n in os.listdir(os.path.join(out, split))]
    return {"ledger_bytes": os.path.getsize(os.path.join(out, "ledger.parquet")), "data_parts": len(parts),
            "data_bytes": sum(os.path.getsize(p) for p in parts)}


def full_run(root: str, out: str, extra: list[str], total: int) -> dict:
    started = time.time()
    job = start_job(root, out, LOGS + "/full.log", extra)
    sampler = Sampler(job.pid, out)
    sampler.start()
    code = job.wait()
    sampler.stop.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"extraction failed (exit {code}); see {LOGS}/full.log")
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    last_commit = max(t for t, done, _ in sampler.samples if done < total) if sampler.samples else started
    figures = {"seconds": round(time.time() - started), "processed": manifest["processed"],
               "seconds_after_last_commit": round(time.time() - last_commit),
               **tenth_figures(sampler.samples, total, started),
               "load_average_by_tenth": load_by_tenth(sampler, total)}
    figures["flat_ratio_100_over_10"] = flatness(figures["peaks"])
    figures["audit"] = audit(root, out)
    figures["output"] = output_sizes(out)
    return figures


def killed_run(root: str, out: str, extra: list[str], total: int, kill_at: float) -> dict:
    job = start_job(root, out, LOGS + "/killed.log", extra)
    sampler = Sampler(job.pid, out, period=1.0)
    sampler.start()
    try:
        while sampler.committed() < kill_at * total:
            if job.poll() is not None:
                raise SystemExit(f"the job ended before {kill_at:.0%} was committed; see {LOGS}/killed.log")
            time.sleep(0.5)
    finally:
        kill_tree(job)
        sampler.stop.set()
        sampler.join()
    committed = committed_rows(out, {})
    started = time.time()
    rerun = start_job(root, out, LOGS + "/rerun.log", extra)
    if rerun.wait() != 0:
        raise SystemExit(f"the rerun failed; see {LOGS}/rerun.log")
    with open(os.path.join(out, "manifest.json")) as f:
        processed = json.load(f)["processed"]
    left = total - committed
    return {"committed_at_kill": committed, "left_at_kill": left, "rerun_processed": processed,
            "redone": processed - left, "rerun_seconds": round(time.time() - started), "audit": audit(root, out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "cats_vs_dogs_small"))
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--kill-at", type=float, default=0.6)
    parser.add_argument("--parts", default="full,killed", help="full, killed or both")
    parser.add_argument("--work-dir", default="/tmp/ric-soak")
    args = parser.parse_args()
    extra = ["--image-size", str(args.image_size), "--weights", args.weights]
    shutil.rmtree(args.work_dir, ignore_errors=True)
    os.makedirs(LOGS, exist_ok=True)
    root = os.path.join(args.work_dir, "data")
    started = time.time()
    figures: dict = {"data": build_root(os.path.abspath(args.data_dir), root, args.files),
                     "image_size": args.image_size, "weights": args.weights}
    figures["data"]["build_seconds"] = round(time.time() - started)
    print(f"built {args.files} files in {figures['data']['build_seconds']} s", flush=True)
    try:
        if "full" in args.parts:
            figures["full"] = full_run(root, os.path.join(args.work_dir, "full"), extra, args.files)
            print(json.dumps(figures["full"]), flush=True)
        if "killed" in args.parts:
            figures["killed"] = killed_run(root, os.path.join(args.work_dir, "killed"), extra, args.files,
                                           args.kill_at)
            print(json.dumps(figures["killed"]), flush=True)
    finally:
        # A run of one part keeps the other part's earlier result file.
        parts = "" if {"full", "killed"} <= set(args.parts.split(",")) else "-" + args.parts
        write_result(("soak" if args.files >= 1_000_000 else f"soak-{args.files}") + parts, figures)
        shutil.rmtree(args.work_dir, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
