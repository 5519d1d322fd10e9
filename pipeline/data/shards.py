"""Feature shards as extraction writes them and every later stage reads them: Parquet files per split
(``<output>/<split>/part-*.parquet``), one row per image (``path``, ``label``, ``class_name``, a
fixed-size-list ``features``), the block-4 cache likewise under ``block4/``, the rejects in one file.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa

from pipeline.data import storage

BLOCK4_DIR = "block4"
# Only training rows get the mirrored copy (block4_flipped): it is cached fine-tuning's flip augmentation.
FLIPPED_SPLIT = "train"
# The block-4 cache is stored (and held by training) in float16: half the bytes of float32, and
# VGG16's block-4 outputs (ReLU'd, at most ~110 on real photos) lose only float16's rounding
# (relative 2^-11) that bench/block4_precision.py shows does not move fine-tuning's accuracy.
BLOCK4_DTYPE = "float16"
REJECTS_FILE = "rejects.parquet"
REJECT_SCHEMA = pa.schema([("path", pa.string()), ("split", pa.string()), ("reason", pa.string()),
                           ("error", pa.string())])

def feature_schema(dim: int, columns: Iterable[str] = ("features",), dtype: str = "float32") -> pa.Schema:
    """The schema of a feature shard: path, label, class name and fixed-size list columns of ``dtype``."""
    return pa.schema([("path", pa.string()), ("label", pa.int32()), ("class_name", pa.string())]
                     + [(c, pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), dim)) for c in columns])


def read_split(output_dir: str, split: str, columns: list[str] | None = None) -> pa.Table | None:
    """One split's feature shards as an Arrow table, read with pyarrow alone."""
    return storage.read_parquet_files(storage.list_parquet(storage.join(output_dir, split)), columns)


def list_rows(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column as a 2-D numpy array, one row per list (no per-row Python work)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def features_as_array(table: pa.Table, shape: Iterable[int]) -> np.ndarray:
    """The ``features`` column as an ``(n, *shape)`` float32 array."""
    return list_rows(table.column("features")).reshape(len(table), *shape).astype(np.float32, copy=False)
