"""GPU ceilings for the product's inference path, for a machine with a GPU but no TensorFlow or Ray.

Measures, on whatever machine it runs on:

1. the VGG16 conv base (the project's own ``pipeline.nets.models.feature_extractor``) with Keras 3
   on the JAX backend, float32 vs mixed bfloat16, at the project's batch sizes: images/s and
   peak GPU memory — the per-GPU ceiling of one inference actor;
2. the project's own decode function on real JPEGs, the fast JPEG path against Pillow alone
   (the decoder before it), on one core and on every core (``bench/decode_throughput.py``'s
   measurement) — the per-node decode ceiling, i.e. how many GPUs one node's CPUs can keep
   fed at the product's defaults (``--precision auto`` resolved for this GPU as an actor resolves
   it, ExtractConfig's batch size);
3. fine-tuning training steps (SGD, the training default precision for this GPU and FinetuneConfig's
   batch size, the project's own models): the full image model with blocks 1-4 frozen (streamed
   fine-tuning) against block 5 + top on block-4
   inputs (``--cache-block4``), samples/s of training and of evaluation, and the per-epoch
   speed-up they imply for 2000 training and 800 validation images.

    KERAS_BACKEND=jax python bench/gpu_check.py --images DIR [--image-size 224] [--parts decode,inference,finetune]

The image size and batch sizes default to the product's (``pipeline.config``). Needs no
TensorFlow or Ray: Keras 3, JAX, numpy, Pillow, simplejpeg, numba, pyarrow and PyYAML (what
``pipeline.images.decode`` and ``pipeline.config`` import). Prints a table and, on its final line,
one JSON object with every figure; they also go to ``bench/results/gpu_check.json`` (date, CPU,
commit, command; the commit reads ``unknown`` where the copy has no git).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from bench.decode_throughput import identical, measure, read_photos  # noqa: E402
from bench.result_file import cpu_name, write_result  # noqa: E402
from pipeline.config import ExtractConfig, FinetuneConfig  # noqa: E402
from pipeline.nets.precision import precision_for  # noqa: E402

# What the product's actors and workers run at unless told otherwise; the precisions (``auto``) are resolved
# for the device in main, as an inference actor or a training worker resolves them.
EXTRACT = {f: ExtractConfig.__dataclass_fields__[f].default for f in ("image_size", "precision", "batch_size")}
FINETUNE = {f: FinetuneConfig.__dataclass_fields__[f].default for f in ("precision", "batch_size")}


def _model_throughput(args: tuple[int, str, int, float]) -> dict[str, float]:
    size, precision, batch, seconds = args
    import jax

    from pipeline.nets.models import feature_extractor

    model = feature_extractor(size, None, "torch", precision)
    x = np.random.default_rng(0).integers(0, 256, size=(batch, size, size, 3)).astype(np.float32)
    model.predict_on_batch(x)  # compile
    model.predict_on_batch(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        np.asarray(model.predict_on_batch(x))
        n += batch
    rate = n / (time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}
    return {"images_per_s": round(rate, 1), "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)}


def _finetune_throughput(args: tuple[int, int, float, bool, str]) -> dict[str, float]:
    size, batch, seconds, cached, precision = args
    import keras

    from pipeline.nets import models, vgg16

    if cached:
        model = models.block5_classifier(vgg16.block4_shape(size), 2, precision)
        shape = vgg16.block4_shape(size)
    else:
        features = models.feature_extractor(size, None, "torch", precision)
        for layer in features.get_layer("vgg16").layers:
            layer.trainable = layer.name.startswith("block5")
        model = models.image_classifier(features, models.top_classifier(vgg16.feature_shape(size), 2, precision))
        shape = (size, size, 3)
    model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255 if not cached else 4, size=(batch, *shape)).astype(np.float32)
    y = rng.integers(0, 2, size=(batch, 1)).astype(np.float32)
    rates = {}
    for name, step in (("train", lambda: model.train_on_batch(x, y)), ("eval", lambda: model.predict_on_batch(x))):
        step()  # compile
        step()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            np.asarray(step())
            n += batch
        rates[f"{name}_samples_per_s"] = round(n / (time.perf_counter() - start), 1)
    return rates


def finetune_throughput(size: int, batch: int, seconds: float, cached: bool, precision: str) -> dict[str, float]:
    """Training and evaluation samples/s of streamed or cached fine-tuning, in a fresh process."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.map(_finetune_throughput, [(size, batch, seconds, cached, precision)])[0]


def model_throughput(size: int, precision: str, batch: int, seconds: float) -> dict[str, float]:
    """Images/s and peak device memory of the VGG16 feature extractor at one batch size.

    Each configuration runs in a fresh process, so its peak memory is its own.
    """
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.map(_model_throughput, [(size, precision, batch, seconds)])[0]


def capability(device) -> tuple[int, int] | None:
    """A JAX GPU's compute capability as ``precision_for`` takes it; None on a CPU (its own rule applies)."""
    if device.platform != "gpu":
        return None
    major, _, minor = str(getattr(device, "compute_capability", "0.0")).partition(".")
    return int(major), int(minor or 0)


def decode_part(figures: dict, images: str, size: int) -> dict:
    """Both decoders on one core and on every core; their figures."""
    cores = os.cpu_count() or 1
    every = measure(read_photos(images, None), size, cores)
    same, differ = identical(size)
    figures.update(cpu=cpu_name(), decode=every, decode_identical_pixels=same, decode_differing=differ[:20])
    for n in (1, cores):
        print(f"decode+resize to {size}px on {n} core(s): Pillow alone "
              f"{every[f'pillow_images_per_s_{n}_cores']:.0f} img/s, fast path "
              f"{every[f'fast_images_per_s_{n}_cores']:.0f} img/s (x{every[f'speedup_{n}_cores']})")
    print(f"identical pixels on {same} photos, {len(differ)} differ")
    return every


def inference_part(figures: dict, size: int, batches: list[int], seconds: float, precision: str,
                   every: dict | None) -> None:
    """VGG16's images/s and peak memory per precision and batch; how much of it one node's cores decode."""
    print(f"VGG16 conv base on {figures['device']} ({figures['backend']}):")
    print(f"{'precision':>10} {'batch':>6} {'img/s':>9} {'peak GiB':>9}")
    for p in dict.fromkeys(("float32", "bfloat16", precision)):  # the default too, where it is float16
        for batch in batches:
            r = model_throughput(size, p, batch, seconds)
            figures[f"vgg16_{p}_b{batch}"] = r
            print(f"{p:>10} {batch:>6} {r['images_per_s']:>9.1f} {r['peak_gib']:>9.2f}", flush=True)
    default = figures.get(f"vgg16_{precision}_b{EXTRACT['batch_size']}", {}).get("images_per_s")
    figures["default_model_images_per_s"] = default  # bench/decode_throughput.py reads it
    if every is not None and default:
        cores = os.cpu_count() or 1
        for name in ("pillow", "fast"):
            fed = every[f"{name}_images_per_s_{cores}_cores"] / default
            figures[f"gpu_fed_fraction_{name}"] = round(min(fed, 1.0), 2)
            figures[f"node_decode_over_model_{name}"] = round(fed, 2)
        print(f"one node's cores decode {figures['node_decode_over_model_pillow']}x (Pillow alone) and "
              f"{figures['node_decode_over_model_fast']}x (fast path) what one GPU actor takes at "
              f"{precision}, batch {EXTRACT['batch_size']} ({default:.0f} img/s)")


def finetune_part(figures: dict, size: int, seconds: float, precision: str) -> None:
    """Streamed against cached fine-tuning steps, and the model time per epoch of the sample (2000 + 800)."""
    batch = FINETUNE["batch_size"]
    print(f"fine-tuning steps on {figures['device']}, {precision}, batch {batch} (samples/s):")
    epoch = {}
    for cached in (False, True):
        mode = "cached" if cached else "streamed"
        r = finetune_throughput(size, batch, seconds, cached, precision)
        figures[f"finetune_{mode}"] = r
        epoch[mode] = 2000 / r["train_samples_per_s"] + 800 / r["eval_samples_per_s"]
        print(f"{mode:>10}: train {r['train_samples_per_s']:>9.1f}  eval {r['eval_samples_per_s']:>9.1f}  "
              f"model time per epoch (2000 + 800) {epoch[mode]:.2f} s", flush=True)
    figures["finetune_cached_speedup_model_time"] = round(epoch["streamed"] / epoch["cached"], 2)
    print(f"cached fine-tuning: {figures['finetune_cached_speedup_model_time']}x less model time per epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of real JPEGs for the decode measurement")
    parser.add_argument("--image-size", type=int, default=EXTRACT["image_size"])
    parser.add_argument("--batch-sizes", default=",".join(str(EXTRACT["batch_size"] * k) for k in (1, 2, 4, 8)))
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per configuration")
    parser.add_argument("--parts", default="decode,inference,finetune", help="which measurements to run")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    batches = [int(b) for b in args.batch_sizes.split(",")]

    figures: dict[str, object] = {"cpu_cores": os.cpu_count(), "image_size": args.image_size, "batch_sizes": batches,
                                  "seconds": args.seconds, "parts": sorted(parts)}
    # Decode first: forking after JAX has started its threads can deadlock.
    every = decode_part(figures, args.images, args.image_size) if "decode" in parts else None

    import jax

    device = jax.devices()[0]
    inference = precision_for(EXTRACT["precision"], capability(device))
    training = precision_for(FINETUNE["precision"], capability(device), allow_float16=False)
    figures.update(device=str(getattr(device, "device_kind", device)), backend=jax.default_backend(),
                   default_precision=inference, default_batch=EXTRACT["batch_size"], finetune_precision=training,
                   finetune_batch=FINETUNE["batch_size"])
    if "inference" in parts:
        inference_part(figures, args.image_size, batches, args.seconds, inference, every)
    if "finetune" in parts:
        finetune_part(figures, args.image_size, args.seconds, training)
    write_result("gpu_check", figures)
    print(json.dumps(figures))  # last: the line that holds every figure


if __name__ == "__main__":
    main()
