"""The hostile corpus under load: peak memory of every Ray process while extraction decodes a root
full of the worst inputs, and the audit of what each file became.

The root is ``tests/hostile.py``'s (odd names, link loops, a folder linked in, hard links, EPS
named .jpg, a truncated JPEG with a large header, the 9400x9400 16-bit PNG) with more of the
memory-hungry cases added: ``--huge`` copies of the 16-bit PNG (rejected "too large" from its
header) and ``--near-cap`` RGB PNGs just under the pixel cap (decoded in full: the real worst
case for a decode task), among ``--photos`` good photos per split and class. The extraction job
runs in its own process (its own local Ray, ``--weights none`` at 32 px: the decode tasks are
what is measured), and every process of its tree is sampled every 50 ms.

Printed and written to ``bench/results/hostile_corpus.json``: the job's exit status, the audit
(rows, duplicates, rejects by reason, files unaccounted for), and the peak RSS per process kind
(decode tasks, other Ray workers, Ray's own services, the driver) against the 1 GiB bound.

    python bench/hostile_corpus.py [--photos 25] [--huge 4] [--near-cap 4]
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.result_file import write_result  # noqa: E402
from pipeline.data.shards import read_split  # noqa: E402
from pipeline.images.decode import MAX_PIXELS  # noqa: E402
from tests.conftest import real_images  # noqa: E402
from tests.hostile import build, huge_png  # noqa: E402

BOUND_MIB = 1024


def near_cap_png(seed: int) -> bytes:
    """An RGB PNG of noise just under the pixel cap: decoded in full, never rejected."""
    side = int((MAX_PIXELS * 0.98) ** 0.5)
    noise = Image.effect_noise((side, side), 40 + seed).convert("RGB")
    buf = io.BytesIO()
    noise.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def kind(proc: psutil.Process) -> str:
    """Which part of the job a process is, from the title Ray gives its workers."""
    try:
        title = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    if "ReadImageBlocks" in title:
        return "decode task"
    if title.startswith("ray::"):
        return "other Ray worker: " + title.split()[0][5:].split("(")[0][:40]
    if "jobs.extract_features" in title:
        return "driver"
    return "Ray services"


def sample(proc: subprocess.Popen) -> dict[str, float]:
    """Peak RSS (MiB) per process kind of ``proc``'s tree until it exits."""
    peaks: dict[str, float] = collections.defaultdict(float)
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in tree:
            try:
                peaks[kind(p)] = max(peaks[kind(p)], p.memory_info().rss / 2**20)
            except psutil.Error:
                pass
        time.sleep(0.05)
    return dict(peaks)


def audit(out: str, expected) -> dict:
    """What the output holds against what ``tests/hostile.py`` says each file must become."""
    import pyarrow.parquet as pq

    rows = [r for s in ("train", "validation") for r in (read_split(out, s, ["path", "class_name"]) or []).to_pylist()]
    paths = collections.Counter(r["path"] for r in rows)
    rejects = {r["path"]: r["reason"] for r in pq.read_table(os.path.join(out, "rejects.parquet")).to_pylist()}
    wrong_class = sum(expected.rows.get(r["path"]) != r["class_name"] for r in rows)
    unaccounted = set(expected.rows) - set(paths) | set(expected.rejects) - set(rejects)
    return {"rows": len(rows), "expected_rows": len(expected.rows), "duplicated_rows": sum(n - 1 for n in paths.values()),
            "rows_in_wrong_class_or_unexpected": wrong_class, "rejects_by_reason": collections.Counter(rejects.values()),
            "wrong_reject_reasons": sorted(p for p, r in rejects.items() if r not in expected.rejects.get(p, ())),
            "unaccounted_files": sorted(unaccounted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=25, help="good photos per split and class")
    parser.add_argument("--huge", type=int, default=4, help="extra copies of the 9400x9400 16-bit PNG")
    parser.add_argument("--near-cap", type=int, default=4, help="RGB PNGs just under the pixel cap")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="hostile-")
    try:
        root, out = os.path.join(work, "data"), os.path.join(work, "out")
        photos = {(s, c): real_images(s, c, args.photos) for s in ("train", "validation") for c in ("cats", "dogs")}
        huge = huge_png()
        expected = build(root, os.path.join(work, "outside"), photos, huge)
        for i in range(args.huge):
            with open(os.path.join(root, "train", "cats", f"huge-{i}.png"), "wb") as f:
                f.write(huge)
            expected.rejects[f"train/cats/huge-{i}.png"] = {"too large"}
        for i in range(args.near_cap):
            with open(os.path.join(root, "validation", "cats", f"near-cap-{i}.png"), "wb") as f:
                f.write(near_cap_png(i))
            expected.rows[f"validation/cats/near-cap-{i}.png"] = "cats"
        command = [sys.executable, "-m", "jobs.extract_features", "--data-dir", root, "--output-dir", out,
                   "--weights", "none", "--image-size", "32", "--precision", "float32", "--max-reject-fraction", "0.9"]
        started = time.time()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peaks = sample(proc)
        log = proc.communicate()[0]
        figures = {"exit_status": proc.returncode, "seconds": round(time.time() - started, 1),
                   "pixel_cap": MAX_PIXELS, "bound_mib": BOUND_MIB,
                   "peak_rss_mib": {k: round(v, 1) for k, v in sorted(peaks.items())},
                   "audit": audit(out, expected) if proc.returncode == 0 else log[-3000:]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    decode_peak = figures["peak_rss_mib"].get("decode task", float("nan"))
    print(f"exit {figures['exit_status']} in {figures['seconds']} s; decode task peak {decode_peak} MiB "
          f"(bound {BOUND_MIB} MiB)")
    for name, mib in figures["peak_rss_mib"].items():
        print(f"  {name:50s} {mib:8.1f} MiB")
    print(f"audit: {figures['audit']}")
    write_result("hostile_corpus", figures)


if __name__ == "__main__":
    main()
