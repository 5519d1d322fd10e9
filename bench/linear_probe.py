"""Logistic regression on extracted bottleneck features: how linearly separable they are.

    python bench/linear_probe.py outputs/features/cats_vs_dogs_small

Prints the validation accuracy on its final line. Needs scikit-learn (the `test` extra).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, ".")
from pipeline.data import storage  # noqa: E402
from pipeline.data.shards import read_split  # noqa: E402
from pipeline.data.shards import features_as_array


def load(features_dir: str, split: str, shape) -> tuple[np.ndarray, np.ndarray]:
    table = read_split(features_dir, split)
    return features_as_array(table, shape).reshape(len(table), -1), table.column("label").to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("features_dir", help="output folder of jobs.extract_features")
    parser.add_argument("--C", type=float, default=0.1, help="inverse L2 regularisation strength")
    args = parser.parse_args()
    manifest = storage.read_json(storage.join(args.features_dir, storage.MANIFEST))
    x_train, y_train = load(args.features_dir, "train", manifest["feature_shape"])
    x_val, y_val = load(args.features_dir, "validation", manifest["feature_shape"])
    started = time.time()
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=args.C, max_iter=2000).fit(scaler.transform(x_train), y_train)
    accuracy = float((clf.predict(scaler.transform(x_val)) == y_val).mean())
    print(f"train {len(y_train)} validation {len(y_val)} precision {manifest['precision']} "
          f"fit {time.time() - started:.1f}s")
    print(f"linear probe validation accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
