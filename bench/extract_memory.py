"""Peak memory of extraction as the data set grows: streaming must stay flat.

    python bench/extract_memory.py [--data-dir ../shared/data/cats_vs_dogs_small] [--factor 4]

Runs the extraction job twice, each in a fresh process with its own local Ray cluster: on the
data set, and on a data set `--factor` times larger (the same files linked under other names).
Every 0.25 s it samples the proportional set size (PSS: shared pages such as Ray's object store
counted once) of the driver alone and of the driver with all its descendants (Ray's GCS,
raylet, workers, actors). A fixed overhead of a few GiB would hide a leak in a ratio of
peaks, so the script reports what a leak would move: the growth of each peak per added
image, against the bytes of one decoded image (150 x 150 x 3 = 67.5 kB). A pipeline that
kept every decoded image would grow by at least that much per image; the bound is a tenth of
it. Also printed: the ratio of the peaks (the older target, <= 1.25). The final line holds
the figures.
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


def own_memory(proc: psutil.Process) -> int:
    info = proc.memory_full_info()
    return getattr(info, "pss", info.rss)


def peak_of_job(data_dir: str, output_dir: str) -> dict[str, float]:
    """Peak PSS of the whole process tree and of the driver alone, the seconds and the images."""
    started = time.time()
    job = subprocess.Popen([sys.executable, "-m", "jobs.extract_features", "--data-dir", data_dir,
                            "--output-dir", output_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = psutil.Process(job.pid)
    peak = driver = 0
    while job.poll() is None:
        try:
            driver = max(driver, own_memory(proc))
            peak = max(peak, tree_memory(proc))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.25)
    if job.returncode != 0:
        raise SystemExit(f"extraction failed on {data_dir} (exit {job.returncode})")
    with open(os.path.join(output_dir, "manifest.json")) as f:
        n = json.load(f)["num_images"]
    return {"tree": peak, "driver": driver, "seconds": time.time() - started, "images": n}


def replicate(src: str, dst: str, factor: int) -> None:
    """``factor`` copies of every image of ``src`` under ``dst``, as symlinks with distinct names."""
    for dirpath, _, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in files:
            for k in range(factor):
                os.symlink(os.path.join(os.path.abspath(dirpath), name), os.path.join(dst, rel, f"copy{k}-{name}"))


IMAGE_BYTES = 150 * 150 * 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "cats_vs_dogs_small"))
    parser.add_argument("--factor", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = peak_of_job(args.data_dir, os.path.join(tmp, "small"))
        big_data = os.path.join(tmp, "big-data")
        replicate(args.data_dir, big_data, args.factor)
        big = peak_of_job(big_data, os.path.join(tmp, "big"))
    figures = {"small_images": small["images"], "large_images": big["images"]}
    added = big["images"] - small["images"]
    for part in ("tree", "driver"):
        growth = (big[part] - small[part]) / added
        figures.update({f"{part}_peak_gib_small": round(small[part] / 2**30, 3),
                        f"{part}_peak_gib_large": round(big[part] / 2**30, 3),
                        f"{part}_growth_bytes_per_image": round(growth),
                        f"{part}_growth_within_bound": growth <= IMAGE_BYTES / 10})
        print(f"{part:>6}: peak {small[part] / 2**30:.2f} GiB for {small['images']} images, "
              f"{big[part] / 2**30:.2f} GiB for {big['images']}: {growth / 1e3:+.1f} kB per added image "
              f"(a decoded image is {IMAGE_BYTES / 1e3:.1f} kB; bound {IMAGE_BYTES / 10e3:.2f} kB)")
    figures["tree_peak_ratio"] = round(big["tree"] / small["tree"], 3)
    print(f"peak ratio of the whole tree {figures['tree_peak_ratio']} for {added / small['images'] + 1:.0f}x the "
          f"images; {small['seconds']:.0f}s and {big['seconds']:.0f}s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
