"""The block-4 cache in float16 against float32: fine-tuning's accuracy, and the bytes held.

    python bench/block4_precision.py --features-dir F --top-model M [--epochs 2] [--seeds 0,1]

``F`` is an extraction with ``--cache-block4`` (either dtype) and ``M`` a ``train_top`` model
trained on it. The script writes two copies of F's block-4 cache, one in float32 and one in
float16 (the product's default, ``pipeline.data.shards.BLOCK4_DTYPE``), beside links to F's
feature shards, and a copy of M whose metadata names each copy; then it runs ``jobs.finetune``
as a user does (its defaults, but ``--epochs`` and ``--seed``) on each, seed by seed. Printed per
seed and dtype: validation accuracy and loss of the exported model, the worker's peak memory and
the bytes it held; and the float16 maps' rounding (the largest relative change of a value in
float16's normal range, the largest absolute change, and how many non-zero values became 0). The
same seed on both dtypes trains from the same top model on the same batches and augmentation, so
the difference is the dtype's. Figures go to ``bench/results/block4_precision.json``;
``--rounding-only`` measures the rounding alone (``block4_precision-rounding.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.process_memory import run_sampled  # noqa: E402
from bench.result_file import write_result  # noqa: E402
from pipeline.data.shards import BLOCK4_DIR, feature_schema, list_rows  # noqa: E402
from pipeline.nets.modelfile import METADATA_NAME  # noqa: E402

GIB = 2**30


def rounding(values: np.ndarray, cast: np.ndarray) -> dict[str, float]:
    """What casting ``values`` (float32) to ``cast`` changed: the largest relative change among
    values in float16's normal range, the largest absolute change, non-zero values made 0."""
    change = np.abs(cast.astype(np.float32) - values)
    normal = np.abs(values) >= np.finfo(np.float16).tiny
    return {"max_relative": float(np.max(change[normal] / np.abs(values[normal]), initial=0.0)),
            "max_absolute": float(change.max(initial=0.0)), "nonzero_made_zero": int(np.sum((values != 0) & (cast == 0))),
            "values": int(values.size)}


def cast_cache(source: str, target: str, dtype: str) -> dict[str, float]:
    """Link ``source``'s feature shards into ``target`` and write its block-4 cache there in
    ``dtype``; returns the rounding of the map values (``rounding``, summed over the parts)."""
    os.makedirs(target)
    for name in os.listdir(source):
        if name not in (BLOCK4_DIR, "manifest.json"):
            os.symlink(os.path.join(source, name), os.path.join(target, name))
    with open(os.path.join(source, "manifest.json")) as f:
        manifest = json.load(f)
    manifest.update(output_dir=target)
    manifest["block4"]["dtype"] = dtype
    with open(os.path.join(target, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    total = {"max_relative": 0.0, "max_absolute": 0.0, "nonzero_made_zero": 0, "values": 0}
    for split in os.listdir(os.path.join(source, BLOCK4_DIR)):
        os.makedirs(os.path.join(target, BLOCK4_DIR, split))
        for part in os.listdir(os.path.join(source, BLOCK4_DIR, split)):
            table = pq.read_table(os.path.join(source, BLOCK4_DIR, split, part))
            columns = [c for c in table.column_names if c.startswith("block4")]
            dim = table.schema.field(columns[0]).type.list_size
            data = {c: table.column(c) for c in ("path", "label", "class_name")}
            for c in columns:
                values = list_rows(table.column(c)).astype(np.float32)
                cast = values.astype(dtype)
                for key, value in rounding(values, cast).items():
                    total[key] = max(total[key], value) if key.startswith("max") else total[key] + value
                data[c] = pa.FixedSizeListArray.from_arrays(pa.array(cast.reshape(-1)), dim)
            pq.write_table(pa.table(data, schema=feature_schema(dim, columns, dtype)),
                           os.path.join(target, BLOCK4_DIR, split, part))
    return total


def top_model_for(source: str, target: str, features_dir: str) -> None:
    """A copy of the model ``source`` whose metadata names ``features_dir`` (fine-tuning reads
    the cache of the feature folder its top model was trained on)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == METADATA_NAME:
                data = json.dumps({**json.loads(data), "features_dir": features_dir}).encode()
            dst.writestr(item, data)


def finetune(top_model: str, out: str, seed: int, epochs: int, logs: str) -> dict:
    """``jobs.finetune`` on ``top_model``'s cache; its summary's figures."""
    run_sampled(["jobs.finetune", "--top-model", top_model, "--output-dir", out, "--epochs", str(epochs),
                 "--seed", str(seed)], REPO, os.path.join(logs, f"{os.path.basename(out)}.log"))
    with open(os.path.join(out, "finetune", "summary.json")) as f:
        done = json.load(f)
    return {"accuracy": done["accuracy"], "loss": round(done["loss"], 4),
            "last_epoch_accuracy": done["last_epoch_accuracy"], "best_epoch": done["best_epoch"],
            "worker_peak_gib": [round(b / GIB, 2) for b in done["worker_peak_rss_bytes"]],
            "held_gib_per_worker": round(done.get("held_bytes_per_worker", 0) / GIB, 2), "seconds": done["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features-dir", required=True)
    parser.add_argument("--top-model", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rounding-only", action="store_true", help="measure the float16 rounding, train nothing")
    args = parser.parse_args()
    if args.rounding_only:
        with tempfile.TemporaryDirectory(prefix="ric-block4-") as tmp:
            figures = {"rounding_float16": cast_cache(os.path.abspath(args.features_dir), os.path.join(tmp, "f"),
                                                      "float16")}
        write_result("block4_precision-rounding", figures)
        print(json.dumps(figures))
        return
    figures: dict = {"epochs": args.epochs, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="ric-block4-") as tmp:
        logs = os.path.join(tmp, "logs")
        os.makedirs(logs)
        for dtype in ("float32", "float16"):
            features = os.path.join(tmp, f"features-{dtype}")
            figures[f"rounding_{dtype}"] = cast_cache(os.path.abspath(args.features_dir), features, dtype)
            figures[f"cache_bytes_on_disk_{dtype}"] = sum(
                os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(os.path.join(features, BLOCK4_DIR))
                for n in names)
            model = os.path.join(tmp, f"top-{dtype}.keras")
            top_model_for(args.top_model, model, features)
            for seed in map(int, args.seeds.split(",")):
                out = os.path.join(tmp, f"run-{dtype}-{seed}")
                figures["runs"].setdefault(str(seed), {})[dtype] = finetune(model, out, seed, args.epochs, logs)
                print(dtype, seed, json.dumps(figures["runs"][str(seed)][dtype]), flush=True)
            shutil.rmtree(features)
    figures["accuracy_change_float16_minus_float32"] = {
        seed: round(runs["float16"]["accuracy"] - runs["float32"]["accuracy"], 5) for seed, runs in figures["runs"].items()}
    write_result("block4_precision", figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
