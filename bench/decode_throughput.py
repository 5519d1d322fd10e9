"""Decode + resize throughput: the decoder before the fast JPEG path (Pillow alone) against
today's (libjpeg-turbo through simplejpeg at Pillow's DCT scale + pipeline.images.resample), on the
same real photos, one run.

    python bench/decode_throughput.py [--data-dir ../shared/data/cats_vs_dogs_small] [--image-size 224]
                                      [--processes N] [--limit N] [--gpu-model-rate IMAGES_PER_S]

Prints images/s on one core (one process) and on every core (one process per core) for each
decoder; the photos are read into memory first, so the disk is not measured. Then how many
photos decode to identical pixels with both decoders (identical pixels give identical
features and predictions, so any that differ are listed with the largest pixel difference),
and the projected rate of a 16-core GPU node against the model rate measured there
(``bench/gpu_check.py``'s result file, when it was made at the same image size; else
``--gpu-model-rate``). The image size defaults to extraction's (``ExtractConfig``). The final
line holds every figure as JSON; they also go to ``bench/results/decode_throughput.json`` (date,
CPU, commit, command).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.result_file import RESULTS, cpu_name, write_result  # noqa: E402
from pipeline.config import ExtractConfig  # noqa: E402
from pipeline.images.decode import decode_image  # noqa: E402

DECODERS = {"pillow": functools.partial(decode_image, fast_jpeg=False), "fast": decode_image}
_PHOTOS: list[bytes] = []  # filled before forking, so the workers share the bytes


def read_photos(folder: str, limit: int | None) -> list[bytes]:
    """The bytes of every .jpg under ``folder`` (sorted; the first ``limit``)."""
    paths = sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names
                   if f.lower().endswith((".jpg", ".jpeg")))[:limit]
    if not paths:
        raise SystemExit(f"no JPEG files under {folder}")
    photos = []
    for path in paths:
        with open(path, "rb") as f:
            photos.append(f.read())
    return photos


def _decode_share(args: tuple[str, int, int, int, int]) -> int:
    name, size, start, step, repeats = args
    decode = DECODERS[name]
    share = _PHOTOS[start::step]
    for _ in range(repeats):
        for data in share:
            decode(data, size)
    return len(share) * repeats


def rate(name: str, size: int, processes: int, per_process: int = 1500) -> float:
    """Images/s of decoder ``name`` over every photo, split across ``processes`` forked processes,
    each decoding its share until it has done at least ``per_process`` images (a few seconds)."""
    repeats = -(-per_process * processes // len(_PHOTOS))
    with mp.get_context("fork").Pool(processes) as pool:
        pool.map(_decode_share, [(name, size, i, processes * 8, 1) for i in range(processes)])  # warm up
        start = time.perf_counter()
        done = sum(pool.map(_decode_share, [(name, size, i, processes, repeats) for i in range(processes)]))
    return done / (time.perf_counter() - start)


def identical(size: int) -> tuple[int, list[tuple[int, int]]]:
    """How many photos both decoders turn into the same pixels; (index, max difference) of the others."""
    differ = []
    for i, data in enumerate(_PHOTOS):
        a, b = DECODERS["pillow"](data, size), DECODERS["fast"](data, size)
        if not np.array_equal(a, b):
            differ.append((i, int(np.abs(a.astype(int) - b).max())))
    return len(_PHOTOS) - len(differ), differ


def measure(photos: list[bytes], size: int, processes: int) -> dict[str, float]:
    """Both decoders' images/s on one core and on ``processes`` cores, and their ratios."""
    _PHOTOS[:] = photos
    for name in DECODERS:  # compile the resize kernels once, before forking
        DECODERS[name](photos[0], size)
    figures: dict[str, float] = {}
    for cores in (1, processes):
        for name in DECODERS:
            figures[f"{name}_images_per_s_{cores}_cores"] = round(rate(name, size, cores), 1)
        figures[f"speedup_{cores}_cores"] = round(figures[f"fast_images_per_s_{cores}_cores"]
                                                  / figures[f"pillow_images_per_s_{cores}_cores"], 2)
    return figures


def gpu_model_rate(image_size: int) -> float | None:
    """One GPU actor's images/s at the product's defaults, from ``bench/results/gpu_check.json``
    when it measured this image size (a rate at another size would mislead: VGG16's work grows with
    the pixels); None otherwise."""
    try:
        with open(os.path.join(RESULTS, "gpu_check.json")) as f:
            gpu = json.load(f)
    except (OSError, ValueError):
        return None
    return gpu.get("default_model_images_per_s") if gpu.get("image_size") == image_size else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "cats_vs_dogs_small"))
    parser.add_argument("--image-size", type=int, default=ExtractConfig.__dataclass_fields__["image_size"].default)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="processes for the all-cores rate")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N photos")
    parser.add_argument("--gpu-model-rate", type=float, default=None,
                        help="VGG16 images/s of one GPU actor at the product's defaults (default: "
                             "bench/results/gpu_check.json's, if it measured --image-size)")
    args = parser.parse_args()
    model_rate = args.gpu_model_rate or gpu_model_rate(args.image_size)
    photos = read_photos(args.data_dir, args.limit)
    print(f"{len(photos)} photos to {args.image_size} px on {os.cpu_count()} cores: {cpu_name()}")
    figures = {"photos": len(photos), "image_size": args.image_size, "processes": args.processes,
               "limit": args.limit, "data_dir": args.data_dir, "cpu": cpu_name(), "cpu_cores": os.cpu_count(),
               **measure(photos, args.image_size, args.processes)}
    for cores in (1, args.processes):
        print(f"{cores:>2} core(s): Pillow alone {figures[f'pillow_images_per_s_{cores}_cores']:>8.1f} images/s, "
              f"fast path {figures[f'fast_images_per_s_{cores}_cores']:>8.1f} images/s, "
              f"x{figures[f'speedup_{cores}_cores']}")
    same, differ = identical(args.image_size)
    figures.update(identical_pixels=same, differing=differ[:20])
    print(f"identical pixels on {same} of {len(photos)} photos" + (f"; differing (index, max diff): {differ[:20]}"
                                                                   if differ else ""))
    node = 16 * figures["fast_images_per_s_1_cores"]
    figures.update(projected_16_core_node=round(node), gpu_model_rate=model_rate,
                   feeds_gpu=round(node / model_rate, 2) if model_rate else None)
    print(f"projected 16-core node at this per-core rate: {node:.0f} images/s, " + (
        f"{figures['feeds_gpu']:.2f} of one GPU actor's {model_rate:.0f} images/s" if model_rate else
        f"no GPU model rate at {args.image_size} px (run bench/gpu_check.py or pass --gpu-model-rate)"))
    write_result("decode_throughput", figures)
    print(json.dumps(figures))  # last: the line that holds every figure


if __name__ == "__main__":
    main()
