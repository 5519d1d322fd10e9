"""Logistic regression on extracted bottleneck features: how linearly separable they are.

    python bench/linear_probe.py outputs/cats_vs_dogs_small/features

Prints the validation accuracy on its final line; the figures, with the features' image size,
precision and weights (from their manifest: the probe measures the extraction it is given, so a
figure at the product's defaults needs features extracted at them), go to
``bench/results/linear_probe.json`` (date, CPU, commit, command). Needs scikit-learn (the `test` extra).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.result_file import write_result  # noqa: E402
from pipeline.config import ExtractConfig  # noqa: E402
from pipeline.data import storage  # noqa: E402
from pipeline.data.shards import features_as_array, read_split  # noqa: E402

DEFAULT_IMAGE_SIZE = ExtractConfig.__dataclass_fields__["image_size"].default


def load(features_dir: str, split: str, shape) -> tuple[np.ndarray, np.ndarray]:
    table = read_split(features_dir, split)
    return features_as_array(table, shape).reshape(len(table), -1), table.column("label").to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("features_dir", help="output of jobs.extract_features")
    parser.add_argument("--C", type=float, default=0.1, help="inverse L2 regularisation strength")
    args = parser.parse_args()
    manifest = storage.read_json(storage.join(args.features_dir, storage.MANIFEST))
    if manifest.get("image_size") != DEFAULT_IMAGE_SIZE:
        print(f"note: these features are at {manifest.get('image_size')} px, not extraction's default "
              f"{DEFAULT_IMAGE_SIZE}")
    x_train, y_train = load(args.features_dir, "train", manifest["feature_shape"])
    x_val, y_val = load(args.features_dir, "validation", manifest["feature_shape"])
    started = time.time()
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=args.C, max_iter=2000).fit(scaler.transform(x_train), y_train)
    accuracy = float((clf.predict(scaler.transform(x_val)) == y_val).mean())
    fit_s = time.time() - started
    print(f"train {len(y_train)} validation {len(y_val)} precision {manifest['precision']} "
          f"fit {fit_s:.1f}s")
    write_result("linear_probe", {
        "features_dir": args.features_dir, "C": args.C, "image_size": manifest.get("image_size"),
        "precision": manifest["precision"], "weights": manifest.get("weights"), "train": len(y_train),
        "validation": len(y_val), "fit_s": round(fit_s, 1), "accuracy": round(accuracy, 4)})
    print(f"linear probe validation accuracy: {accuracy:.4f}")  # last, as before


if __name__ == "__main__":
    main()
