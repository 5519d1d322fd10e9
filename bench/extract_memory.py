"""Peak memory of extraction as the data set grows: streaming must stay flat.

    python bench/extract_memory.py [--data-dir ../shared/data/cats_vs_dogs_small] [--factor 4]

Runs the extraction job twice, each in a fresh process with its own local Ray cluster: on the
data set, and on a data set `--factor` times larger (the same files linked under other names).
Every 0.25 s it sums the proportional set size (PSS: shared pages such as Ray's object store
counted once) of the driver and all its descendants (Ray's GCS, raylet, workers, actors).
Target: the larger run's peak <= 1.25x the smaller's. The final line holds the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil


def tree_memory(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def peak_of_job(data_dir: str, output_dir: str) -> tuple[int, float, int]:
    started = time.time()
    job = subprocess.Popen([sys.executable, "-m", "jobs.extract_features", "--data-dir", data_dir,
                            "--output-dir", output_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = psutil.Process(job.pid)
    peak = 0
    while job.poll() is None:
        try:
            peak = max(peak, tree_memory(proc))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.25)
    if job.returncode != 0:
        raise SystemExit(f"extraction failed on {data_dir} (exit {job.returncode})")
    with open(os.path.join(output_dir, "manifest.json")) as f:
        n = json.load(f)["num_images"]
    return peak, time.time() - started, n


def replicate(src: str, dst: str, factor: int) -> None:
    """``factor`` copies of every image of ``src`` under ``dst``, as symlinks with distinct names."""
    for dirpath, _, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in files:
            for k in range(factor):
                os.symlink(os.path.join(os.path.abspath(dirpath), name), os.path.join(dst, rel, f"copy{k}-{name}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "cats_vs_dogs_small"))
    parser.add_argument("--factor", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small_peak, small_s, small_n = peak_of_job(args.data_dir, os.path.join(tmp, "small"))
        print(f"{small_n} images: peak {small_peak / 2**30:.2f} GiB in {small_s:.0f}s")
        big = os.path.join(tmp, "big-data")
        replicate(args.data_dir, big, args.factor)
        big_peak, big_s, big_n = peak_of_job(big, os.path.join(tmp, "big"))
        print(f"{big_n} images: peak {big_peak / 2**30:.2f} GiB in {big_s:.0f}s")
    ratio = big_peak / small_peak
    print(f"peak ratio {ratio:.2f} for {big_n / small_n:.0f}x the images (target <= 1.25)")
    print(json.dumps({"small_images": small_n, "small_peak_gib": round(small_peak / 2**30, 3),
                      "large_images": big_n, "large_peak_gib": round(big_peak / 2**30, 3), "peak_ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
