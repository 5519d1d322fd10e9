"""Extraction throughput against the seed's way and against the model's own ceiling.

    python bench/extract_throughput.py [--data-dir ../shared/data/cats_vs_dogs_small]

Measures, on the same machine in one run, images/s of:
  1. the seed's way: Keras `image_dataset_from_directory` (the Keras 3 successor of
     `flow_from_directory`) + `model.predict`, float32, one process;
  2. the ceiling: the same VGG16 on already-decoded arrays in memory, at the project's best
     precision (bfloat16 where the CPU has it), warmed up, every batch padded to 32 as the job
     pads it (no retracing on a short tail); the same in float32, so the precision ratio
     compares like with like;
  3. this project's extraction job end to end (decode + inference + Parquet), default settings,
     including Ray's start-up, and its inference actor's busy fraction: the share of the time
     from its first batch to its last that it spent inside its calls (from the manifest). Below
     1, the actor waited for decoded images or lost its cores to the decode tasks.
Then the agreement of float32 and bfloat16 features on the same real images (min cosine) and
the validation accuracy of the seed's top MLP trained (in-process, identically) on each.
Every measurement runs at extraction's defaults (``ExtractConfig``: image size, weights,
precision, batch size); ``--image-size`` changes all of them alike, the job's included. The final
line holds every figure, and the CPU it ran on; they also go to
``bench/results/extract_throughput.json`` (date, CPU, commit, command).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.result_file import cpu_name, write_result  # noqa: E402
from pipeline.config import ExtractConfig  # noqa: E402
from pipeline.data.discover import discover  # noqa: E402
from pipeline.images.decode import load_image  # noqa: E402
from pipeline.nets import models, vgg16  # noqa: E402
from pipeline.nets.precision import precision_for  # noqa: E402
from pipeline.nets.weights import load_weight_arrays, resolve_weights  # noqa: E402

# The extraction job's defaults: the in-memory ceiling is measured as the job runs (224 px, not the 150 of
# earlier figures).
DEFAULTS = {f: ExtractConfig.__dataclass_fields__[f].default for f in ("image_size", "weights", "precision",
                                                                       "batch_size")}
BATCH = DEFAULTS["batch_size"]
SEED_BATCH = 32  # the seed's image_dataset_from_directory batch (its own, not the product's)
TOP_EPOCHS = 20  # the in-process top MLP that compares float32 and bfloat16 features


def seed_way(data_dir: str, model, size: int) -> tuple[float, int]:
    import keras

    start = time.perf_counter()
    n = 0
    for split in ("train", "validation"):
        ds = keras.utils.image_dataset_from_directory(os.path.join(data_dir, split), image_size=(size, size),
                                                      batch_size=SEED_BATCH, shuffle=False, label_mode="binary",
                                                      verbose=False)
        for x, _ in ds:
            model.predict_on_batch(x)
            n += len(x)
    return n / (time.perf_counter() - start), n


def features(model, images: np.ndarray) -> tuple[np.ndarray, float]:
    """Features of ``images`` in the job's batches (the tail padded, as the job does) and images/s."""
    pad = (-len(images)) % BATCH
    padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]) if pad else images
    model.predict_on_batch(padded[:BATCH])  # warm-up: graph tracing is not throughput
    start = time.perf_counter()
    out = np.concatenate([np.asarray(model.predict_on_batch(padded[i:i + BATCH]), np.float32)
                          for i in range(0, len(padded), BATCH)])[:len(images)]
    return out.reshape(len(images), -1), len(images) / (time.perf_counter() - start)


def in_memory_rate(model, decoded: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    """Features of every split and the images/s over all of them."""
    out, seconds = {}, 0.0
    for split, images in decoded.items():
        out[split], rate = features(model, images)
        seconds += len(images) / rate
    return out, sum(len(v) for v in decoded.values()) / seconds


def top_accuracy(x_train, y_train, x_val, y_val, shape, seed=0) -> float:
    import keras

    keras.utils.set_random_seed(seed)
    top = models.top_classifier(shape, 2)
    top.compile(optimizer="rmsprop", loss="binary_crossentropy", metrics=["accuracy"])
    top.fit(x_train.reshape(-1, *shape), y_train, epochs=TOP_EPOCHS, batch_size=32, verbose=0)
    return float(top.evaluate(x_val.reshape(-1, *shape), y_val, verbose=0)[1])


def job_rate(data_dir: str, size: int, images: int) -> tuple[float, dict]:
    """The extraction job end to end, at its defaults but ``size``: images/s and its manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jobs.extract_features", "--data-dir", data_dir, "--image-size", str(size),
                        "--output-dir", os.path.join(tmp, "features")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rate = images / (time.perf_counter() - started)
        with open(os.path.join(tmp, "features", "manifest.json")) as f:
            return rate, json.load(f)


def precision_agreement(figures: dict, best: str, size: int, decoded: dict, labels: dict, feats_f32: dict,
                        feats_fast: dict) -> None:
    """Into ``figures``: the min cosine of float32 and ``best`` features, and the top MLP's accuracy on each."""
    cos = [float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
           for s in decoded for a, b in zip(feats_f32[s], feats_fast[s])]
    figures["min_cosine_float32_vs_bf16"] = round(min(cos), 6)
    shape = tuple(vgg16.feature_shape(size))
    acc32 = top_accuracy(feats_f32["train"], labels["train"], feats_f32["validation"], labels["validation"], shape)
    acc16 = top_accuracy(feats_fast["train"], labels["train"], feats_fast["validation"], labels["validation"], shape)
    figures["top_val_accuracy_float32"] = round(acc32, 4)
    figures["top_val_accuracy_bf16"] = round(acc16, 4)
    figures["top_epochs"] = TOP_EPOCHS
    print(f"float32 vs {best} features: min cosine {min(cos):.6f}; top MLP validation accuracy "
          f"{acc32:.4f} (float32) vs {acc16:.4f} ({best}), difference {abs(acc32 - acc16) * 100:.2f} points")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "cats_vs_dogs_small"))
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"])
    args = parser.parse_args()
    size = args.image_size
    best = precision_for(DEFAULTS["precision"], None)
    source = resolve_weights(DEFAULTS["weights"])
    arrays = load_weight_arrays(source, size)
    f32 = models.feature_extractor(size, arrays, source.preprocessing, "float32")
    fast = models.feature_extractor(size, arrays, source.preprocessing, best)
    figures: dict[str, object] = {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "best_precision": best,
                                  "image_size": size, "batch_size": BATCH, "weights": DEFAULTS["weights"],
                                  "data_dir": args.data_dir}
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")

    seed_rate, n = seed_way(args.data_dir, f32, size)
    figures["images"] = n
    figures["1_seed_way_float32_images_per_s"] = round(seed_rate, 2)
    print(f"1. seed's way (image_dataset_from_directory + predict, float32): {seed_rate:.1f} images/s over {n}")

    index = discover(args.data_dir)
    files = {s: index.rows(s) for s in ("train", "validation")}
    decoded = {s: np.stack([load_image(f["path"], size) for f in fs]) for s, fs in files.items()}
    labels = {s: np.array([f["label"] for f in fs], np.float32) for s, fs in files.items()}
    feats_fast, ceiling = in_memory_rate(fast, decoded)
    feats_f32, f32_rate = in_memory_rate(f32, decoded)
    figures["2_ceiling_in_memory_images_per_s"] = round(ceiling, 2)
    figures["2_in_memory_float32_images_per_s"] = round(f32_rate, 2)
    figures["best_precision_over_float32_in_memory"] = round(ceiling / f32_rate, 2)
    print(f"2. ceiling (VGG16 on decoded arrays, {best}): {ceiling:.1f} images/s; float32 the same way "
          f"{f32_rate:.1f}: {best} runs at {ceiling / f32_rate:.2f}x float32")

    rate, manifest = job_rate(args.data_dir, size, n)
    figures["3_job_end_to_end_images_per_s"] = round(rate, 2)
    figures["3_job_pipeline_images_per_s"] = manifest["images_per_s"]
    busy = [a["busy_fraction"] for a in manifest["inference_actors"]]
    figures["3_actor_busy_fraction"] = min(busy)
    figures["3_job_precision"] = manifest.get("precision")
    print(f"3. extraction job end to end (with Ray start-up): {rate:.1f} images/s "
          f"(manifest, without process start: {manifest['images_per_s']}); inference actor busy "
          f"{', '.join(f'{b:.3f}' for b in busy)} of the time from its first batch to its last (target >= 0.75)")
    figures["ratio_3_over_1"] = round(rate / seed_rate, 2)
    figures["ratio_3_over_2"] = round(rate / ceiling, 2)
    print(f"(3)/(1) = {figures['ratio_3_over_1']} (target >= 5); (3)/(2) = {figures['ratio_3_over_2']} (target >= 0.75)")

    if best != "float32":
        precision_agreement(figures, best, size, decoded, labels, feats_f32, feats_fast)
    write_result("extract_throughput", figures)
    print(json.dumps(figures))  # last: the line that holds every figure


if __name__ == "__main__":
    main()
