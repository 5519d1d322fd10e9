"""Bottleneck feature extraction: files → Ray Data decode tasks → VGG16 actor pool → Parquet shards.

Output layout (``<output>/``)::

    manifest.json          classes, counts, rejects, weights, preprocessing, precision, timings
    rejects.parquet        path, split, reason, error of every file that could not be decoded
    train/part-*.parquet   path, label, class_name, features (fixed_size_list<float32>[H*W*C])
    validation/…, test/…
    block4/<split>/…       with --cache-block4: path, label, class_name, block4, and for the
                           train split block4_flipped (block-4 output of the mirrored image)

``features`` is a plain Arrow fixed-size list, so any Arrow reader opens it; its
shape is ``manifest["feature_shape"]`` (``manifest["block4"]["shape"]`` for the cache).
Rows are written in a seeded random order, so every shard mixes the classes.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections import Counter
from dataclasses import asdict
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import ray
from ray.data import Datasink

from pipeline import storage, vgg16
from pipeline.cluster import (InferencePlan, configure_tensorflow_devices, inference_plan, pin_to_this_node,
                              wait_for_gpus)
from pipeline.config import ExtractConfig, InferenceOptions
from pipeline.decode import decode_batch
from pipeline.discover import DatasetIndex, discover
from pipeline.errors import DataError, OutputError
from pipeline.faults import maybe_kill
from pipeline.precision import device_precision
from pipeline.reuse import fingerprint, job_settings, require_same
from pipeline.versions import library_versions
from pipeline.weights import WeightsSource, load_weight_arrays, resolve_weights

REJECTS_DIR = "_rejects"
BLOCK4_DIR = "block4"
# Only training rows get the mirrored copy: it is the augmentation of cached fine-tuning.
FLIPPED_SPLIT = "train"
ROW_ORDER_SEED = 0
REJECTS_FILE = "rejects.parquet"
REJECT_SCHEMA = pa.schema([("path", pa.string()), ("split", pa.string()), ("reason", pa.string()),
                           ("error", pa.string())])


def feature_schema(dim: int, columns: Iterable[str] = ("features",)) -> pa.Schema:
    """The schema of a feature shard: path, label, class name and fixed-size float32 list columns."""
    return pa.schema([("path", pa.string()), ("label", pa.int32()), ("class_name", pa.string())]
                     + [(c, pa.list_(pa.float32(), dim)) for c in columns])


def _decode_here(batch: dict[str, Any], image_size: int) -> dict[str, Any]:
    out = decode_batch(batch, image_size)
    out["decode_node"] = np.full(len(out["image"]), ray.get_runtime_context().get_node_id()[:12], dtype=object)
    return out


def decoded_images(rows: list[dict[str, Any]], image_size: int, batch_size: int, decode_cpus: float) -> ray.data.Dataset:
    """A Ray dataset of ``rows`` (each with a ``path``) plus decoded ``image``, ``reason``, ``error``
    and the ``decode_node`` that decoded it.

    Decoding runs in parallel Ray tasks, one file at a time inside each batch, so a
    bad file becomes a reject row instead of failing its block (unlike
    ``ray.data.read_images``). Local paths are decoded on the driver's node, the only
    one sure to have them; URIs anywhere.
    """
    blocks = max(1, math.ceil(len(rows) / batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    remote_args = {"num_cpus": decode_cpus, **(pin_to_this_node(rows[0]["path"]) if rows else {})}
    # A ray_remote_args_fn keeps Ray Data from fusing decoding into the inference
    # actors (it fuses ops whose remote args match), which would serialise decode
    # and inference inside one process instead of overlapping them. Ray 2.60 (the
    # pinned version) has no other switch for that; its deprecation notice is noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
        return ds.map_batches(_decode_here, fn_kwargs={"image_size": image_size}, batch_size=batch_size,
                              batch_format="numpy", ray_remote_args_fn=lambda: remote_args)


def find_rejects(rows: list[dict[str, Any]], image_size: int, batch_size: int) -> list[dict[str, str]]:
    """Decode every row's file once with Ray Data and return the ones that fail (path, split, reason, error)."""
    def reasons(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: batch[k] for k in ("relpath", "split", "reason", "error")}

    ds = decoded_images(rows, image_size, batch_size, inference_plan(1).decode_cpus).map_batches(reasons, batch_format="numpy")
    rejects = []
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        bad = batch["reason"] != ""
        rejects += [{"path": str(p), "split": str(s), "reason": str(r), "error": str(e)} for p, s, r, e in
                    zip(batch["relpath"][bad], batch["split"][bad], batch["reason"][bad], batch["error"][bad])]
    return sorted(rejects, key=lambda r: (r["split"], r["path"]))


def map_with_actors(ds: ray.data.Dataset, actor_cls: type, constructor_kwargs: dict[str, Any],
                    plan: InferencePlan, batch_size: int) -> ray.data.Dataset:
    """Run ``actor_cls`` over ``ds`` in a pool of ``plan.actors`` actors, each built once."""
    return ds.map_batches(
        actor_cls,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
    )


def run_model_on_good_rows(predict_fn, images: np.ndarray, ok: np.ndarray, batch_size: int):
    """Call ``predict_fn`` on the rows where ``ok`` only, padded to ``batch_size`` so TF never retraces.

    Returns None when no row is ok; else the output array, or a list of arrays for a
    model with several outputs.
    """
    good = images[ok]
    if len(good) == 0:
        return None
    pad = (-len(good)) % batch_size
    if pad:
        good = np.concatenate([good, np.zeros((pad, *good.shape[1:]), good.dtype)])
    chunks = [predict_fn(good[i:i + batch_size]) for i in range(0, len(good), batch_size)]
    n = int(ok.sum())
    if isinstance(chunks[0], (list, tuple)):
        return [np.concatenate([np.asarray(c[k], dtype=np.float32) for c in chunks])[:n] for k in range(len(chunks[0]))]
    return np.concatenate([np.asarray(c, dtype=np.float32) for c in chunks])[:n]


def _rows_of(values: np.ndarray | None, ok: np.ndarray, dim: int) -> np.ndarray:
    """``(len(ok), dim)`` float32 rows: ``values`` flattened where ``ok``, zeros elsewhere."""
    out = np.zeros((len(ok), dim), dtype=np.float32)
    if values is not None:
        out[ok] = values.reshape(len(values), dim)
    return out


def actor_identity(precision: str) -> str:
    """Which node, process and GPUs an inference actor runs on, and the precision it chose, as JSON
    (recorded in the manifest)."""
    return json.dumps({"node": ray.get_runtime_context().get_node_id()[:12], "pid": os.getpid(),
                       "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                       "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "precision": precision},
                      sort_keys=True)


def tally_batch(batch: dict[str, np.ndarray]) -> dict[str, Counter[str]]:
    """Rows of a written batch per inference actor and per decoding node (a sink's write result)."""
    return {"actors": Counter(str(a) for a in batch["actor"]),
            "decode_nodes": Counter(str(n) for n in batch["decode_node"])}


def merge_tallies(write_returns: Iterable[dict[str, Counter[str]]]) -> dict[str, Any]:
    """Rows per inference actor (with its node, GPUs and precision) and per decoding node,
    from the sinks' write results."""
    actors: Counter[str] = Counter()
    nodes: Counter[str] = Counter()
    for tally in write_returns:
        actors.update(tally["actors"])
        nodes.update(tally["decode_nodes"])
    return {"actors": [{**json.loads(identity), "rows": rows} for identity, rows in sorted(actors.items())],
            "decode_nodes": dict(sorted(nodes.items()))}


class TallyingSink(Datasink):
    """A Datasink whose write tasks return ``tally_batch`` counts, merged into ``self.tally`` at the end."""

    tally: dict[str, Any] = {"actors": [], "decode_nodes": {}}

    def on_write_complete(self, write_result) -> None:
        self.tally = merge_tallies(write_result.write_returns)

    @staticmethod
    def empty_tally() -> dict[str, Counter[str]]:
        """What a write task returns before it has written a batch."""
        return {"actors": Counter(), "decode_nodes": Counter()}

    @staticmethod
    def count(tally: dict[str, Counter[str]], batch: dict[str, np.ndarray]) -> None:
        """Add a written batch's rows to a write task's ``tally``."""
        for key, counts in tally_batch(batch).items():
            tally[key].update(counts)


def actors_precision(actors: list[dict[str, Any]], requested: str) -> str:
    """The precision the inference actors ran at: theirs when they agree, ``mixed`` when they do not."""
    chosen = {a["precision"] for a in actors}
    return chosen.pop() if len(chosen) == 1 else ("mixed" if chosen else requested)


class FeatureActor:
    """A Ray Data actor that holds one VGG16 and turns image batches into bottleneck features.

    With ``cache_block4`` it also returns the block-4 output of every image and, for
    training rows, of the mirrored image (blocks 1–4 only: block 5 is not needed there).
    """

    def __init__(self, image_size: int, weight_arrays: list[np.ndarray] | None, preprocessing: str,
                 precision: str, batch_size: int, cache_block4: bool = False):
        configure_tensorflow_devices()
        from pipeline.models import block4_extractors, feature_extractor

        precision = device_precision(precision)
        if isinstance(weight_arrays, ray.ObjectRef):
            weight_arrays = ray.get(weight_arrays)
        if cache_block4:
            self.model, self.block4_model = block4_extractors(image_size, weight_arrays, preprocessing, precision)
        else:
            self.model = feature_extractor(image_size, weight_arrays, preprocessing, precision)
            self.block4_model = None
        self.batch_size = batch_size
        self.feature_dim = int(np.prod(vgg16.feature_shape(image_size)))
        self.block4_dim = int(np.prod(vgg16.block4_shape(image_size)))
        self.identity = actor_identity(precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        maybe_kill("extract")
        images = batch.pop("image")
        ok = batch["reason"] == ""
        outputs = run_model_on_good_rows(self.model.predict_on_batch, images, ok, self.batch_size)
        if self.block4_model is None:
            batch["features"] = _rows_of(outputs, ok, self.feature_dim)
        else:
            block4, features = outputs if outputs is not None else (None, None)
            batch["features"] = _rows_of(features, ok, self.feature_dim)
            batch["block4"] = _rows_of(block4, ok, self.block4_dim)
            train = ok & (np.asarray(batch["split"]) == FLIPPED_SPLIT)
            flipped = run_model_on_good_rows(self.block4_model.predict_on_batch, images[:, :, ::-1], train,
                                             self.batch_size)
            batch["block4_flipped"] = _rows_of(flipped, train, self.block4_dim)
        batch["actor"] = np.full(len(images), self.identity, dtype=object)
        return batch


def write_rejects_part(staging: str, name: str, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Write a batch's undecodable rows to ``<staging>/_rejects/<name>``; return the mask of good rows."""
    ok = np.array([r == "" for r in batch["reason"]], dtype=bool)
    bad = ~ok
    if bad.any():
        splits = batch["split"][bad] if "split" in batch else np.full(int(bad.sum()), "")
        storage.write_parquet(storage.join(staging, REJECTS_DIR, name), pa.table({
            "path": [str(p) for p in batch["relpath"][bad]],
            "split": [str(s) for s in splits],
            "reason": [str(r) for r in batch["reason"][bad]],
            "error": [str(e) for e in batch["error"][bad]],
        }, schema=REJECT_SCHEMA))
    return ok


class FeatureSink(TallyingSink):
    """Writes each block's good rows into ``<split>/`` shards and its rejects into ``_rejects/``;
    with ``block4_dim`` also the block-4 cache into ``block4/<split>/``.

    File names come from the write task's index, so a task that Ray retries after a
    failure overwrites its own earlier files instead of adding duplicates.
    """

    def __init__(self, staging: str, dim: int, block4_dim: int | None = None):
        self.staging = staging
        self.dim = dim
        self.block4_dim = block4_dim

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Counter[str]]:
        from ray.data.block import BlockAccessor

        tally = self.empty_tally()
        for n, block in enumerate(blocks):
            batch = BlockAccessor.for_block(block).to_numpy()
            if len(batch["path"]) == 0:
                continue
            name = f"part-{ctx.task_idx:05d}-{n:04d}.parquet"
            self.count(tally, batch)
            ok = write_rejects_part(self.staging, name, batch)
            splits = np.asarray([str(s) for s in batch["split"]])
            for split in sorted(set(splits[ok])):
                rows = ok & (splits == split)
                self._write(storage.join(self.staging, split, name), batch, rows, self.dim, ["features"])
                if self.block4_dim is not None:
                    columns = ["block4", "block4_flipped"] if split == FLIPPED_SPLIT else ["block4"]
                    self._write(storage.join(self.staging, BLOCK4_DIR, split, name), batch, rows, self.block4_dim,
                                columns)
        return tally

    @staticmethod
    def _write(uri: str, batch: dict[str, np.ndarray], rows: np.ndarray, dim: int, columns: list[str]) -> None:
        data: dict[str, Any] = {
            "path": [str(p) for p in batch["relpath"][rows]],
            "label": pa.array(batch["label"][rows].astype(np.int32)),
            "class_name": [str(c) for c in batch["class_name"][rows]],
        }
        for column in columns:
            values = np.ascontiguousarray(np.stack(batch[column][rows]), dtype=np.float32)
            data[column] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)
        storage.write_parquet(uri, pa.table(data, schema=feature_schema(dim, columns)))


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


def extraction_settings(cfg: ExtractConfig, index: DatasetIndex, weights: WeightsSource) -> dict[str, Any]:
    """What decides an extraction's output: its options (the requested precision: with "auto" each
    actor chooses from its device, and the same request on other hardware is the same extraction),
    the weights' checksum and the files under the data root. The block-4 cache is not among them:
    an output with it is a superset of one without."""
    return job_settings(cfg, drop=("data_dir", "weights", "cache_block4", "workers", "gpus", "batch_size",
                                   "max_reject_fraction"),
                        weights_sha256=weights.sha256, preprocessing=weights.preprocessing,
                        inputs=index.fingerprint())


def run_name(data_dir: str) -> str:
    """A run's name: the data folder's name (the last part of a URI)."""
    return storage.basename(data_dir)


def plan_inference(options: InferenceOptions) -> InferencePlan:
    """The actor pool for ``options``; with ``--gpus``, once the cluster has those GPUs."""
    if options.gpus:
        wait_for_gpus(options.gpus, options.gpu_wait_s)
    return inference_plan(options.workers, options.gpus)


def default_output_dir(data_dir: str) -> str:
    """``outputs/<name of the data folder>/features``."""
    return os.path.join("outputs", run_name(data_dir), "features")


def collect_rejects(staging: str, target: str | None = None) -> pa.Table:
    """Merge the ``_rejects/`` parts of a staging folder into one sorted table written to ``target``
    (default ``<staging>/rejects.parquet``) and remove the parts."""
    table = storage.read_parquet_files(storage.list_parquet(storage.join(staging, REJECTS_DIR)))
    if table is None:
        table = REJECT_SCHEMA.empty_table()
    table = table.sort_by([("split", "ascending"), ("path", "ascending")])
    storage.write_parquet(target or storage.join(staging, REJECTS_FILE), table)
    storage.delete_dir(storage.join(staging, REJECTS_DIR))
    return table


def _audit(staging: str, index: DatasetIndex, rejects: pa.Table, block4: bool) -> dict[str, dict[str, int]]:
    """Check that every listed file is in exactly one place (a shard or the rejects), in the
    block-4 cache too when there is one; count per class."""
    counts: dict[str, dict[str, int]] = {}
    rejected = {(s, p) for s, p in zip(rejects.column("split").to_pylist(), rejects.column("path").to_pylist())}
    for split, files in index.splits.items():
        expected = {f.relpath for f in files} - {p for s, p in rejected if s == split}
        for folder in [split] + ([storage.join(BLOCK4_DIR, split)] if block4 else []):
            table = read_split(staging, folder, columns=["path", "class_name"])
            paths = table.column("path").to_pylist() if table is not None else []
            if len(paths) != len(set(paths)) or set(paths) != expected:
                dupes = len(paths) - len(set(paths))
                lost = len(expected - set(paths))
                raise RuntimeError(f"extraction of {folder!r} is inconsistent: {dupes} duplicated and {lost} lost rows")
            if folder == split:  # the cache holds the same paths, hence the same counts
                names = table.column("class_name").to_pylist() if table is not None else []
                counts[split] = {c: names.count(c) for c in index.classes}
    return counts


def run_extraction(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract features for every image of the data root and return the manifest.

    Reuses a finished extraction with the same settings (options, weights, and the size and
    modification time of every input file) and refuses one with other settings, naming them,
    unless ``cfg.overwrite``.
    """
    from pipeline.synthetic import NOTE, default_data_dir, is_synthetic

    started = time.time()
    data_dir = cfg.data_dir or default_data_dir()
    synthetic = is_synthetic(data_dir)
    if synthetic:
        print(f"note: {NOTE}")
    output_dir = cfg.output_dir or default_output_dir(data_dir)
    index = discover(data_dir, cfg.layout, cfg.validation_fraction, cfg.max_images_per_class)
    weights = resolve_weights(cfg.weights, cfg.preprocessing)
    settings = extraction_settings(cfg, index, weights)

    with storage.output_lock(output_dir):
        complete = storage.is_complete(output_dir)
        if complete and not cfg.overwrite:
            manifest = storage.read_json(storage.join(output_dir, storage.MANIFEST))
            require_same(output_dir, "an extraction", manifest.get("settings"), settings)
            if manifest.get("block4") or not cfg.cache_block4:
                print(f"reusing finished extraction in {output_dir} (same settings and inputs; --overwrite redoes it)")
                return manifest
            # The same extraction plus the cache: redoing it replaces the folder with a superset.
            print(f"re-extracting {output_dir} to add the block-4 cache (--cache-block4)")
        elif not complete and storage.exists(output_dir) and not cfg.overwrite:
            raise OutputError(f"{output_dir} exists but is not a finished extraction; pass --overwrite or choose another --output-dir")
        staging = output_dir.rstrip("/") + ".partial"
        storage.delete_dir(staging)  # leftovers of an interrupted run are never reused
        manifest = _extract(cfg, index, weights, plan_inference(cfg), staging)
        manifest.update(settings=settings, fingerprint=fingerprint(settings), synthetic=synthetic,
                        data_dir=storage.absolute(data_dir), output_dir=output_dir)
        manifest["elapsed_s"] = round(time.time() - started, 2)
        manifest["images_per_s"] = round(manifest["num_images"] / max(manifest["elapsed_s"], 1e-9), 2)
        storage.write_json(storage.join(staging, storage.MANIFEST), manifest)
        storage.commit_dir(staging, output_dir)
    return manifest


def _extract(cfg: ExtractConfig, index: DatasetIndex, weights: WeightsSource, plan: InferencePlan,
             staging: str) -> dict[str, Any]:
    shape = vgg16.feature_shape(cfg.image_size)
    dim = int(np.prod(shape))
    block4_shape = vgg16.block4_shape(cfg.image_size)
    files = list(index.all_files())
    # Listed class by class, the files would make one-class shards; a seeded order mixes
    # them, so a reader that streams shards (cached fine-tuning) needs no global shuffle.
    order = np.random.default_rng(ROW_ORDER_SEED).permutation(len(files))
    rows = [{"path": f.path, "relpath": f.relpath, "split": f.split, "label": f.label, "class_name": f.class_name}
            for f in (files[i] for i in order)]
    arrays = load_weight_arrays(weights, cfg.image_size)
    ds = decoded_images(rows, cfg.image_size, cfg.batch_size, plan.decode_cpus)
    ds = map_with_actors(ds, FeatureActor, {
        "image_size": cfg.image_size, "weight_arrays": ray.put(arrays) if arrays is not None else None,
        "preprocessing": weights.preprocessing, "precision": cfg.precision, "batch_size": cfg.batch_size,
        "cache_block4": cfg.cache_block4,
    }, plan, cfg.batch_size)
    storage.make_dir(staging)
    sink = FeatureSink(staging, dim, int(np.prod(block4_shape)) if cfg.cache_block4 else None)
    ds.write_datasink(sink, ray_remote_args=pin_to_this_node(staging))
    rejects = collect_rejects(staging)
    total = len(rows)
    if len(rejects) > cfg.max_reject_fraction * total or len(rejects) == total:
        sample = "; ".join(f"{p} ({r})" for p, r in zip(rejects.column("path").to_pylist()[:5],
                                                       rejects.column("reason").to_pylist()[:5]))
        storage.delete_dir(staging)
        raise DataError(
            f"{len(rejects)} of {total} files could not be decoded, more than --max-reject-fraction "
            f"{cfg.max_reject_fraction}; e.g. {sample}"
        )
    counts = _audit(staging, index, rejects, cfg.cache_block4)
    return {
        "kind": "features",
        "classes": index.classes,
        "layout": index.layout,
        "counts": counts,
        "num_images": sum(sum(c.values()) for c in counts.values()),
        "num_rejects": len(rejects),
        "rejects_by_reason": dict(Counter(rejects.column("reason").to_pylist())),
        "image_size": cfg.image_size,
        "weights": {"source": weights.name, "sha256": weights.sha256},
        "preprocessing": weights.preprocessing,
        "precision": actors_precision(sink.tally["actors"], cfg.precision),
        "precision_requested": cfg.precision,
        "feature_shape": list(shape),
        "feature_column": f"fixed_size_list<float32>[{dim}]",
        "block4": {"dir": BLOCK4_DIR, "shape": list(block4_shape), "flipped_split": FLIPPED_SPLIT,
                   "columns": ["block4", "block4_flipped"]} if cfg.cache_block4 else None,
        "inference": asdict(plan),
        "inference_actors": sink.tally["actors"],
        "decode_nodes": sink.tally["decode_nodes"],
        "driver_node": ray.get_runtime_context().get_node_id()[:12],
        "config": asdict(cfg),
        "versions": library_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

