"""Extraction at scale: a driver that stays small at a million files, and a killed run resumed.

(a) A data root of ``--files`` entries (copies of the shared photos under distinct names, in
    their split/class folders: about 25 GB of disk at a million) is extracted by the real job; printed: seconds to list, seconds
    from the job's start until its first block is committed, and the driver's peak RSS up to
    then. The job is then stopped and the copies removed.
(b) The shared photos copied ``--copies`` times: a full run; then a second run into a new
    output, killed with SIGKILL once about 75% of the files are committed, and rerun. Printed:
    the files the rerun processed against those left when it was killed (the difference is
    committed work redone), whether its rows equal the full run's, and the time of an
    unchanged rerun against the full run.

Targets (2 cores): first block within 60 s and driver peak RSS <= 512 MiB at a million files;
at most 2% of the files recomputed; an unchanged rerun <= 15% of a full run.
The job runs at its defaults. Run: ``python bench/extract_scale.py`` (about 20 minutes on 2
cores). Prints one JSON line last; the figures also go to ``bench/results/extract_scale.json``
(date, CPU, commit, command).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.result_file import write_result  # noqa: E402
from pipeline.config import ExtractConfig  # noqa: E402
from pipeline.data.discover import discover  # noqa: E402

# Files per ledger entry at the job's defaults: how the kill point (75% committed) is counted.
BLOCK_FILES = ExtractConfig.__dataclass_fields__["block_files"].default


def link_root(source: str, root: str, total: int) -> int:
    """``total`` copies under ``root`` of the photos of ``source``, round robin, in the same
    split/class folders under distinct names; returns how many were made. Copies, not links:
    listing counts a file reached by several links (or hard links) once, as one row."""
    rows = discover(source).rows()
    made = 0
    for copy in range(-(-total // len(rows))):
        for row in rows:
            if made == total:
                return made
            stem, ext = os.path.splitext(row["relpath"])
            link = os.path.join(root, f"{stem}-{copy:06d}{ext}")
            os.makedirs(os.path.dirname(link), exist_ok=True)
            shutil.copyfile(row["path"], link)
            made += 1
    return made


MEMORY_FIELDS = ("VmHWM", "RssAnon", "RssFile", "RssShmem")


def memory_mib(pid: int) -> dict[str, float]:
    """A process's peak resident set (``VmHWM``) and its resident set now by kind, in MiB: private
    (``RssAnon``), mapped files such as the libraries (``RssFile``) and shared memory such as the
    pages of Ray's object store it touched (``RssShmem``)."""
    with open(f"/proc/{pid}/status") as f:
        found = {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f) if k in MEMORY_FIELDS}
    return found if len(found) == len(MEMORY_FIELDS) else {}


def start_job(root: str, out: str, log_path: str, *extra: str) -> subprocess.Popen:
    """The extraction job as a user starts it, on a Ray cluster of its own."""
    env = {**os.environ, "RAY_ADDRESS": "local"}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "jobs.extract_features", "--data-dir", root, "--output-dir", out,
                                 *extra], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def entries(out: str) -> list[str]:
    folder = os.path.join(out, "_ledger")
    return [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".parquet")] if os.path.isdir(folder) else []


def committed_rows(out: str) -> int:
    """Files committed so far (rows of the ledger entries)."""
    return sum(pq.read_metadata(e).num_rows for e in entries(out))


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the job's process group: the driver and the Ray cluster it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def listing_seconds(log_path: str) -> float | None:
    """The listing's seconds from the job's log line ``HH:MM:SS listed N files under ROOT in S.Ss``."""
    with open(log_path) as f:
        found = re.search(r"^\S* ?listed \d+ files under .* in ([\d.]+)s$", f.read(), re.MULTILINE)
    return float(found.group(1)) if found else None


def million(work: str, source: str, files: int) -> dict:
    """(a): seconds to list, to the first committed block, and the driver's peak RSS until then."""
    root, out, log = os.path.join(work, "million"), os.path.join(work, "million-out"), os.path.join(work, "million.log")
    started = time.time()
    made = link_root(source, root, files)
    print(f"(a) made {made} links in {time.time() - started:.0f}s")
    started = time.time()
    proc = start_job(root, out, log)
    peaks = dict.fromkeys(MEMORY_FIELDS, 0.0)
    try:
        while True:
            peaks = {k: max(peaks[k], v) for k, v in memory_mib(proc.pid).items()} or peaks
            if entries(out):
                break
            if proc.poll() is not None:
                raise SystemExit(f"the job ended before its first block; see {log}")
            time.sleep(0.2)
        first = time.time() - started
    finally:
        kill(proc)
    peak = peaks["VmHWM"]
    figures = {"files": made, "list_s": listing_seconds(log), "first_block_s": round(first, 1),
               "driver_peak_rss_mib": round(peak, 1),
               **{f"driver_peak_{k.lower()}_mib": round(peaks[k], 1) for k in MEMORY_FIELDS[1:]}}
    print(f"(a) {made} files: listed in {figures['list_s']}s; first block committed {first:.1f}s after start; "
          f"driver peak RSS {peak:.0f} MiB (targets: 60 s, 512 MiB), of which at most {peaks['RssAnon']:.0f} private, "
          f"{peaks['RssFile']:.0f} mapped files (libraries), {peaks['RssShmem']:.0f} object-store pages")
    shutil.rmtree(root)
    shutil.rmtree(out, ignore_errors=True)
    return figures


def run_to_end(root: str, out: str, log: str) -> float:
    started = time.time()
    proc = start_job(root, out, log)
    if proc.wait() != 0:
        raise SystemExit(f"extraction failed; see {log}")
    return time.time() - started


def rows(out: str) -> dict[tuple[str, str], np.ndarray]:
    found = {}
    for split in ("train", "validation"):
        table = pq.read_table(os.path.join(out, split))
        found.update({(split, p): np.asarray(f) for p, f in zip(table.column("path").to_pylist(),
                                                               table.column("features").to_numpy(zero_copy_only=False))})
    return found


def same_rows(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.allclose(a[k], b[k], rtol=1e-3, atol=1e-4) for k in a)


def resume(work: str, source: str, copies: int) -> dict:
    """(b): a full run; a run killed at ~75% and rerun; an unchanged rerun."""
    root = os.path.join(work, "copies")
    total = link_root(source, root, copies * len(discover(source).files))
    full_out, cut_out = os.path.join(work, "full"), os.path.join(work, "cut")
    full_s = run_to_end(root, full_out, os.path.join(work, "full.log"))
    print(f"(b) full run of {total} files: {full_s:.0f}s")
    proc = start_job(root, cut_out, os.path.join(work, "cut.log"))
    try:
        while len(entries(cut_out)) * BLOCK_FILES < 0.75 * total:
            if proc.poll() is not None:
                raise SystemExit("the job ended before the test could kill it")
            time.sleep(0.5)
    finally:
        kill(proc)
    done = committed_rows(cut_out)
    left = total - done
    run_to_end(root, cut_out, os.path.join(work, "rerun.log"))
    with open(os.path.join(cut_out, "manifest.json")) as f:
        processed = json.load(f)["processed"]
    identical = same_rows(rows(cut_out), rows(full_out))
    unchanged_s = run_to_end(root, full_out, os.path.join(work, "unchanged.log"))
    figures = {"files": total, "committed_at_kill": done, "left_at_kill": left, "rerun_processed": processed,
               "recomputed": processed - left, "recomputed_pct": round(100 * (processed - left) / total, 2),
               "rows_equal_full_run": identical, "full_run_s": round(full_s, 1),
               "unchanged_rerun_s": round(unchanged_s, 1), "unchanged_over_full_pct": round(100 * unchanged_s / full_s, 1)}
    print(f"(b) killed with {done} of {total} committed ({100 * done / total:.0f}%): the rerun processed {processed} "
          f"of the {left} left, {processed - left} recomputed ({figures['recomputed_pct']}%; target <= 2%); rows "
          f"equal to the full run's: {identical}")
    print(f"(b) unchanged rerun {unchanged_s:.1f}s vs full run {full_s:.1f}s: {figures['unchanged_over_full_pct']}% "
          f"(target <= 15%)")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "cats_vs_dogs_small"))
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--work-dir", default="/tmp/ric-extract-scale")
    parser.add_argument("--parts", default="million,resume", help="which parts to run: million, resume")
    args = parser.parse_args()
    source = os.path.abspath(args.data_dir)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    os.makedirs(args.work_dir)
    figures: dict[str, object] = {"cpu_cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                                  "data_dir": source, "parts": args.parts, "files": args.files, "copies": args.copies,
                                  "block_files": BLOCK_FILES}
    try:
        if "million" in args.parts:
            figures["million"] = million(args.work_dir, source, args.files)
        if "resume" in args.parts:
            figures["resume"] = resume(args.work_dir, source, args.copies)
    finally:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    write_result("extract_scale", figures)
    print(json.dumps(figures))  # last: the line that holds every figure


if __name__ == "__main__":
    main()
