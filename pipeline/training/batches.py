"""A training worker's batches, held in memory or streamed from its shard, and the driver's rule
that chooses (``held_bytes``; docs/architecture.md#hold-or-stream). Held data gives every worker
count the same global batches; streamed shards depend on the worker count.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.train

from pipeline.data import storage
from pipeline.data.shards import list_rows
from pipeline.training.kinds import Kind, kind_of
from pipeline.training.settings import LoopSettings

# A training worker's private memory (``memory``: not the object store's pages, which the node holds once
# in its own budget): its kind's fixed part (``Kind.worker_fixed_gib``), plus at its peak at most
# HELD_BYTES_FACTOR bytes per byte of data it holds (its copy, batches in flight), as bench/train_memory.py
# measured every kind (bench/results/train_memory*.json; tests/test_memory_rule.py checks).
HELD_BYTES_FACTOR = 2
# The share of the memory Ray may hand out that workers holding data may take; the rest runs beside them.
HOLD_SHARE = 0.5


def read_shards(split_dir: str, columns: list[str]) -> ray.data.Dataset:
    """A split's Parquet shards as a dataset of one block per shard, with ``columns``."""
    # Ray sizes read tasks by the files' size on disk, and features compress about 7x (ReLU zeros): at
    # 25,000 photos its blocks held ~4,900 rows (490 MiB), each streamed worker mapping one or two at once.
    shards = max(1, len(storage.list_parquet(split_dir)))
    # Ray's first Parquet reader: its second (Ray 2.60's default) ignores the block count, packing the
    # shards into ~120 MB blocks, and every execution, so every streamed epoch, starts 32 footer-reading
    # actors, each a new process: on 2 cores a pass over the Kaggle-size features took 3-4x as long
    # (bench/results/parquet_reader.json, docs/performance.md#kaggle-size).
    context = ray.data.DataContext.get_current()
    second, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(split_dir, override_num_blocks=shards).select_columns(columns)
    finally:
        context.use_datasource_v2 = second


def worker_footprint(kind: Kind, nbytes: float) -> float:
    """The peak private memory of a training worker of ``kind`` that holds ``nbytes`` of data, by measurement."""
    return kind.worker_fixed_gib * 2**30 + HELD_BYTES_FACTOR * nbytes


def fits_in_memory(kind: Kind, nbytes: float, workers: int, memory: float | None = None) -> bool:
    """Whether ``workers`` workers of ``kind`` may each hold all ``nbytes`` of training data: their footprints
    together within ``HOLD_SHARE`` of ``memory`` (default: what Ray may hand out cluster-wide)."""
    if memory is None:
        memory = float(ray.cluster_resources().get("memory", 0))
    return workers * worker_footprint(kind, nbytes) <= HOLD_SHARE * memory


def held_bytes(kind: Kind, nbytes: float, workers: int) -> int:
    """``nbytes`` when each worker of ``kind`` may hold data of that size, else 0 (streamed)."""
    return int(nbytes) if fits_in_memory(kind, nbytes, workers) else 0


def batch_inputs(batch: dict[str, Any], s: LoopSettings, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """A Ray Data batch as (model input, labels); images and cached block-4 maps are augmented
    when ``rng`` is given, the top MLP's features never (``kinds``)."""
    labels = np.asarray(batch["label"], dtype=np.int32)
    return kind_of(s.kind, s.cached_block4).inputs(batch, s, rng), labels


def load_shard(shard) -> dict[str, np.ndarray]:
    """A worker's whole shard as numpy columns sorted by path, whatever order Ray read it in (fixed-size
    lists become 2-D arrays). Each block is copied straight into its sorted rows, so the data is held once."""
    blocks = [b for b in shard.iter_batches(batch_size=None, batch_format="pyarrow") if b.num_rows]
    if not blocks:
        return {}
    total = sum(b.num_rows for b in blocks)
    where = np.arange(total)
    if "path" in blocks[0].column_names:
        order = np.argsort(np.concatenate([b.column("path").to_numpy(zero_copy_only=False).astype(str)
                                           for b in blocks]), kind="stable")
        where[order] = np.arange(total)
    held: dict[str, np.ndarray] = {}
    start = 0
    for block in blocks:
        rows = where[start:start + block.num_rows]
        for name in block.column_names:
            column = block.column(name)
            column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
            values = list_rows(column) if pa.types.is_fixed_size_list(column.type) else column.to_numpy(
                zero_copy_only=False)
            if name not in held:
                held[name] = np.empty((total, *values.shape[1:]), dtype=values.dtype)
            held[name][rows] = values
        start += block.num_rows
    return held


def _held_batches(columns: dict[str, np.ndarray], per_worker: int, rank: int, world: int, drop_last: bool,
                  seed: int | None) -> Iterator[dict]:
    """This worker's batches of a split every worker holds whole: each global batch of ``per_worker *
    world`` rows, drawn in one seeded order, is cut into ``world`` slices and this worker takes slice
    ``rank``, so N workers take exactly the steps one worker takes at the same global batch."""
    n = len(columns["label"]) if columns else 0
    order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
    if not drop_last:
        # Evaluation: every row once, spread over the workers. All take as many steps as the
        # one with the most rows (an empty batch adds nothing), so no row is left unevaluated.
        mine = order[rank::world]
        for start in range(0, -(-n // world), per_worker):
            yield {name: values[mine[start:start + per_worker]] for name, values in columns.items()}
        return
    batch = per_worker * world
    for start in range(0, n - n % batch, batch):
        rows = order[start + rank * per_worker:start + (rank + 1) * per_worker]
        yield {name: values[rows] for name, values in columns.items()}


def _streamed_batches(shard, batch_size: int, drop_last: bool, s: LoopSettings, seed: int | None) -> Iterator[dict]:
    """This worker's batches of its own shard, in a local shuffle seeded by ``seed`` (None: in order)."""
    columnar = kind_of(s.kind, s.cached_block4).columnar
    kwargs: dict[str, Any] = {"batch_size": batch_size, "drop_last": drop_last,
                              "batch_format": "pyarrow" if columnar else "numpy"}
    if seed is not None:
        kwargs.update(local_shuffle_buffer_size=max(4 * batch_size, 256), local_shuffle_seed=seed)
    for batch in shard.iter_batches(**kwargs):
        if columnar:
            yield {name: batch.column(name) for name in batch.column_names}
        else:
            yield batch


def epoch_batches(split: str, s: LoopSettings, per_worker: int, drop_last: bool, shuffle_seed: int | None,
                  held: dict[str, dict[str, np.ndarray]]) -> Iterator[dict]:
    """This worker's batches of ``split`` for one epoch: from ``held`` (read whole once; ``_held_batches``)
    when the settings hold the data, else streamed from its shard. ``shuffle_seed`` is the same on every worker."""
    shard = ray.train.get_dataset_shard(split)
    if shard is None:
        return iter(())
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if s.hold_in_memory:
        if split not in held:
            held[split] = load_shard(shard)
        return _held_batches(held[split], per_worker, rank, world, drop_last, shuffle_seed)
    # Streamed shards differ between workers; so do their local shuffles.
    return _streamed_batches(shard, per_worker, drop_last, s,
                             None if shuffle_seed is None else (shuffle_seed + rank) % 2**31)
