"""The audit's view of a feature folder: every photo of every split as one row, its VGG16 block-5
map mean-pooled over the spatial grid (then a square root, see ``pool``) into one unit-length vector
of 512 numbers that no longer depend on where things sit in the frame, so a cropped, shifted or
resized copy lands next to its original and cosine similarity is an inner product. Pooling runs in
one Ray task per shard: the driver holds 2 KB per photo, never the 100 KB of raw features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import ray

from pipeline.batch.extract import SPLITS
from pipeline.data import storage
from pipeline.data.shards import list_rows
from pipeline.errors import DataError

COLUMNS = ["path", "label", "class_name", "features"]


@dataclass
class Corpus:
    """Every photo of a feature folder, in a fixed order (split, then stored path)."""

    paths: np.ndarray  # stored paths relative to ``root`` (``pipeline.names``), as the shards hold them
    splits: np.ndarray
    labels: np.ndarray  # class indices into ``classes``
    classes: list[str]
    features: np.ndarray  # (n, channels) float32, unit length
    root: str  # the data root the paths are relative to
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return len(self.paths)


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def pool(flat: np.ndarray, shape: list[int]) -> np.ndarray:
    """Flattened (h, w, c) feature maps, one per row, as the unit-length square roots of their grid means.

    The square root (power normalisation) damps the few channels that dominate a mean, which separates
    edited copies from distinct photos better than the plain mean (bench/audit_calibration.py)."""
    h, w, c = shape
    return normalise(np.sqrt(np.maximum(flat.reshape(len(flat), h * w, c).mean(axis=1), 0)))


def _pool_shard(uri: str, shape: list[int]) -> dict[str, np.ndarray]:
    table = storage.read_parquet_files([uri], COLUMNS)
    return {"path": np.asarray(table.column("path").to_pylist(), dtype=object),
            "label": table.column("label").to_numpy(), "pooled": pool(list_rows(table.column("features")), shape)}


def read_corpus(features_dir: str, manifest: dict[str, Any]) -> Corpus:
    """Every split of a finished extraction (``manifest`` is its manifest), pooled shard by shard in Ray tasks."""
    shape = manifest["feature_shape"]
    task = ray.remote(_pool_shard).options(num_cpus=1)
    parts: list[tuple[str, dict[str, np.ndarray]]] = []
    for split in SPLITS:
        uris = storage.list_parquet(storage.join(features_dir, split))
        parts += [(split, part) for part in ray.get([task.remote(uri, shape) for uri in uris])]
    if not parts:
        raise DataError(f"{features_dir} holds no feature shards in any of {', '.join(SPLITS)}")
    paths = np.concatenate([p["path"] for _, p in parts])
    splits = np.concatenate([np.full(len(p["path"]), s, dtype=object) for s, p in parts])
    order = np.lexsort((paths.astype(str), splits.astype(str)))
    return Corpus(paths=paths[order], splits=splits[order],
                  labels=np.concatenate([p["label"] for _, p in parts])[order].astype(np.int64),
                  classes=list(manifest["classes"]), features=np.concatenate([p["pooled"] for _, p in parts])[order],
                  root=manifest["data_dir"], manifest=manifest)


def raw_shards(features_dir: str, split: str) -> Iterator[tuple[list[str], np.ndarray]]:
    """One split's stored paths and unpooled features, shard by shard (what a top model reads)."""
    for uri in storage.list_parquet(storage.join(features_dir, split)):
        table = storage.read_parquet_files([uri], ["path", "features"])
        yield table.column("path").to_pylist(), list_rows(table.column("features"))
