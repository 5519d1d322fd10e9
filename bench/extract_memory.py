"""Memory of extraction as the data set grows: streaming must stay flat.

    python bench/extract_memory.py [--data-dir ../shared/data/cats_vs_dogs_small] [--images N] [--factor 4]
                                   [--weights none] [--block-files N] [--mode slope|pair]

``--mode slope`` (the default): one run over the data set copied ``--factor`` times. Every
second the resident memory (RSS) of every process of the job's tree and the files committed
so far are sampled; printed is the least-squares slope of the whole tree's memory against the
files committed over the second half of the run (when start-up is long over): the memory the
tree adds per added image, against the bound of a tenth of a decoded image at the job's
default size. Also the tree's peak in the first and in the last quarter of the files. RSS
counts a page of Ray's object store once in every process that maps it, so the slope is an
upper bound of the real growth.

``--mode pair``, the older measure, described below:

Runs the extraction job twice, each in a fresh process with its own local Ray cluster: on the
data set (or its first ``--images`` files, in proportion per class folder), and on a data set
`--factor` times larger (the same files copied under other names: the job lists a file that
several links reach once).
Every 0.25 s it samples the proportional set size (PSS: shared pages such as Ray's object store
counted once) of the driver alone and of the driver with all its descendants (Ray's GCS,
raylet, workers, actors). A fixed overhead of a few GiB would hide a leak in a ratio of
peaks, so the script reports what a leak would move: the growth of each peak per added
image, against the bytes of one decoded image at the job's default size (224 x 224 x 3 =
150.5 kB, read from ExtractConfig). A pipeline that kept every decoded image would grow by at
least that much per image; the bound is a tenth of it. Also printed: the ratio of the peaks
(the older target, <= 1.25). The figures go to bench/results/extract_memory.json with the
date, CPU, commit and command, and are printed as the final line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.result_file import write_result  # noqa: E402
from pipeline.config import ExtractConfig  # noqa: E402

# The job runs at its default size; the bench reads it rather than assuming one.
IMAGE_SIZE = next(f.default for f in dataclasses.fields(ExtractConfig) if f.name == "image_size")
IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3


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


def peak_of_job(data_dir: str, output_dir: str, extra: list[str]) -> dict[str, float]:
    """Peak PSS of the whole process tree and of the driver alone, the seconds and the images."""
    started = time.time()
    log_path = output_dir + ".log"
    with open(log_path, "w") as log:
        job = subprocess.Popen([sys.executable, "-m", "jobs.extract_features", "--data-dir", data_dir,
                                "--output-dir", output_dir, *extra], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
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
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"extraction failed on {data_dir} (exit {job.returncode}); its output ends:\n{tail}")
    with open(os.path.join(output_dir, "manifest.json")) as f:
        manifest = json.load(f)
    busy = [a["busy_fraction"] for a in manifest["inference_actors"]]
    return {"tree": peak, "driver": driver, "seconds": time.time() - started, "images": manifest["num_images"],
            "busy_fraction": min(busy) if busy else None}


def slope_of_run(data_dir: str, output_dir: str, extra: list[str]) -> dict[str, float]:
    """One run sampled every second: the slope of the tree's RSS against committed files over the
    second half, and the tree's peaks in the first and last quarter."""
    import numpy as np

    from bench.process_memory import run_sampled

    seconds, sampler = run_sampled(["jobs.extract_features", "--data-dir", data_dir, "--output-dir", output_dir,
                                    *extra], REPO, output_dir + ".log", period=1.0, output=output_dir)
    with open(os.path.join(output_dir, "manifest.json")) as f:
        total = json.load(f)["num_images"]
    points = [(done, sum(sum(v) for v in kinds.values())) for _, done, kinds in sampler.samples]
    half = np.array([p for p in points if total / 2 <= p[0] < total], dtype=np.float64)
    slope = float(np.polyfit(half[:, 0], half[:, 1], 1)[0]) if len(half) > 2 else float("nan")
    first = max((m for d, m in points if d <= total / 4), default=0)
    last = max((m for d, m in points if d >= 3 * total / 4), default=0)
    return {"images": total, "seconds": round(seconds), "samples_second_half": len(half),
            "tree_slope_bytes_per_image": round(slope), "tree_slope_decoded_images_per_image": round(slope / IMAGE_BYTES, 4),
            "tree_slope_within_bound": slope <= IMAGE_BYTES / 10,
            "tree_peak_gib_first_quarter": round(first / 2**30, 3), "tree_peak_gib_last_quarter": round(last / 2**30, 3)}


def replicate(src: str, dst: str, factor: int, share: float = 1.0) -> None:
    """``factor`` copies of the first ``share`` of the images of each folder of ``src`` under
    ``dst``, with distinct names (copied: links to one file are listed once)."""
    for dirpath, _, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in sorted(files)[:round(len(files) * share)]:
            for k in range(factor):
                shutil.copyfile(os.path.join(dirpath, name), os.path.join(dst, rel, f"copy{k}-{name}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "cats_vs_dogs_small"))
    parser.add_argument("--images", type=int, default=None, help="use about this many of the files (default: all)")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--weights", default=None, help="the job's --weights (default: the job's default); "
                                                       "none skips loading them, the model's work is the same")
    parser.add_argument("--block-files", type=int, default=None,
                        help="the job's --block-files (default: the job's): smaller blocks show the slope on fewer "
                             "images, once both runs have more blocks than the decode tasks and actors hold at once")
    parser.add_argument("--mode", default="slope", choices=("slope", "pair"))
    args = parser.parse_args()
    extra = (["--weights", args.weights] if args.weights else []) + (
        ["--block-files", str(args.block_files)] if args.block_files else [])
    total = sum(len(files) for _, _, files in os.walk(args.data_dir))
    share = min(1.0, args.images / total) if args.images else 1.0
    if args.mode == "slope":
        with tempfile.TemporaryDirectory() as tmp:
            replicate(args.data_dir, os.path.join(tmp, "data"), args.factor, share)
            figures = {"mode": "slope", "image_size": IMAGE_SIZE, "decoded_image_bytes": IMAGE_BYTES,
                       "weights": args.weights or "default", "block_files": args.block_files or "default",
                       **slope_of_run(os.path.join(tmp, "data"), os.path.join(tmp, "out"), extra)}
        print(f"whole tree: {figures['tree_slope_bytes_per_image'] / 1e3:+.1f} kB per added image over the second "
              f"half of {figures['images']} images = {figures['tree_slope_decoded_images_per_image']} decoded images "
              f"(bound 0.1); peak {figures['tree_peak_gib_first_quarter']} GiB in the first quarter, "
              f"{figures['tree_peak_gib_last_quarter']} GiB in the last")
        write_result("extract_memory", figures)
        print(json.dumps(figures))
        return
    with tempfile.TemporaryDirectory() as tmp:
        small_data, big_data = os.path.join(tmp, "small-data"), os.path.join(tmp, "big-data")
        replicate(args.data_dir, small_data, 1, share)
        small = peak_of_job(small_data, os.path.join(tmp, "small"), extra)
        replicate(args.data_dir, big_data, args.factor, share)
        big = peak_of_job(big_data, os.path.join(tmp, "big"), extra)
    figures = {"image_size": IMAGE_SIZE, "decoded_image_bytes": IMAGE_BYTES, "weights": args.weights or "default",
               "block_files": args.block_files or "default",
               "small_images": small["images"], "large_images": big["images"]}
    added = big["images"] - small["images"]
    for part in ("tree", "driver"):
        growth = (big[part] - small[part]) / added
        figures.update({f"{part}_peak_gib_small": round(small[part] / 2**30, 3),
                        f"{part}_peak_gib_large": round(big[part] / 2**30, 3),
                        f"{part}_growth_bytes_per_image": round(growth),
                        f"{part}_growth_decoded_images_per_image": round(growth / IMAGE_BYTES, 4),
                        f"{part}_growth_within_bound": growth <= IMAGE_BYTES / 10})
        print(f"{part:>6}: peak {small[part] / 2**30:.2f} GiB for {small['images']} images, "
              f"{big[part] / 2**30:.2f} GiB for {big['images']}: {growth / 1e3:+.1f} kB per added image "
              f"= {growth / IMAGE_BYTES:.3f} decoded images (a decoded image is {IMAGE_BYTES / 1e3:.1f} kB at "
              f"{IMAGE_SIZE} px; bound 0.1 = {IMAGE_BYTES / 10e3:.2f} kB)")
    figures["tree_peak_ratio"] = round(big["tree"] / small["tree"], 3)
    figures.update({"seconds_small": round(small["seconds"]), "seconds_large": round(big["seconds"]),
                    "busy_fraction_small": small["busy_fraction"], "busy_fraction_large": big["busy_fraction"]})
    print(f"peak ratio of the whole tree {figures['tree_peak_ratio']} for {added / small['images'] + 1:.0f}x the "
          f"images; {small['seconds']:.0f}s and {big['seconds']:.0f}s; actors busy {small['busy_fraction']} and "
          f"{big['busy_fraction']} of the time")
    write_result("extract_memory-pair", figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
