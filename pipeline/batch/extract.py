"""Bottleneck feature extraction: files → Ray Data decode tasks → VGG16 actor pool → Parquet shards.

The output (``<split>/part-*.parquet`` of plain Arrow fixed-size lists, the ``block4/`` cache,
``rejects.parquet``, the ledger, ``run.json``, and ``manifest.json`` written last) is described in
docs/jobs.md#feature-shards. Rows go in a seeded random order, so every shard mixes the classes. A run
commits block by block (``pipeline.data.ledger``): the next run with the same settings resumes an
interrupted one; a rerun over a changed data root extracts only added and changed files, dropping removed ones.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.batch.cluster import InferencePlan, pin_to_this_node
from pipeline.batch.inference import (
    CommittingSink,
    InferenceActor,
    Tally,
    check_reject_fraction,
    commit_run,
    decoded_images,
    map_with_actors,
    plan_inference,
)
from pipeline.batch.listing import discover_on_this_node
from pipeline.config import ExtractConfig
from pipeline.data import ledger, locks, outputs, storage
from pipeline.data.discover import IMAGE_EXTENSIONS, OPTIONAL_SPLITS, REQUIRED_SPLITS, DatasetIndex, resolve_data
from pipeline.data.reuse import fingerprint, job_settings
from pipeline.data.shards import (
    BLOCK4_DIR,
    BLOCK4_DTYPE,
    FLIPPED_SPLIT,
    REJECT_SCHEMA,
    REJECTS_FILE,
    feature_schema,
)
from pipeline.nets import vgg16
from pipeline.nets.weights import WeightsSource, load_weight_arrays, resolve_weights
from pipeline.options import CONFIG_FILE, resolved
from pipeline.versions import library_versions

log = logging.getLogger(__name__)

ROW_ORDER_SEED = 0
SPLITS = list(REQUIRED_SPLITS + OPTIONAL_SPLITS)
# What an extraction writes (see the module docstring): a data root's own train/ or validation/
# photos are not part-*.parquet files, so an output aimed at a data root is refused.
OUTPUT_LAYOUT = outputs.Layout("an extraction", markers=(storage.MANIFEST, ledger.RUN_FILE), files=(
    *ledger.FILES, REJECTS_FILE, CONFIG_FILE, *(f"{s}/part-*" for s in SPLITS), *(f"{BLOCK4_DIR}/{s}/part-*" for s in SPLITS)))


def _rows_of(values: np.ndarray | None, ok: np.ndarray, dim: int) -> np.ndarray:
    """``(len(ok), dim)`` float32 rows: ``values`` flattened where ``ok``, zeros elsewhere."""
    out = np.zeros((len(ok), dim), dtype=np.float32)
    if values is not None:
        out[ok] = values.reshape(len(values), dim)
    return out


class FeatureActor(InferenceActor):
    """A Ray Data actor holding one VGG16 that turns image batches into bottleneck features; with
    ``cache_block4`` also every image's block-4 output, and every training row's mirror image's."""

    FAULT_SITE = "extract"

    def __init__(self, image_size: int, weight_arrays: list[np.ndarray] | None, preprocessing: str,
                 precision: str, batch_size: int, cache_block4: bool = False):
        self.image_size, self.preprocessing, self.cache_block4 = image_size, preprocessing, cache_block4
        self.feature_dim = int(np.prod(vgg16.feature_shape(image_size)))
        self.block4_dim = int(np.prod(vgg16.block4_shape(image_size)))
        super().__init__(weight_arrays, precision, batch_size)

    def load(self, weight_arrays: list[np.ndarray] | None, precision: str) -> Any:
        # Deferred: pipeline.nets.models loads Keras and TensorFlow, which the job's driver need not.
        from pipeline.nets.models import block4_and_features, feature_extractor

        build = block4_and_features if self.cache_block4 else feature_extractor
        return build(self.image_size, weight_arrays, self.preprocessing, precision)

    def infer(self, batch: dict[str, np.ndarray], images: np.ndarray) -> None:
        ok = batch["reason"] == ""
        outputs = self.run_model(images, ok)
        if self.cache_block4:
            block4, outputs = outputs if outputs is not None else (None, None)
            batch["block4"] = _rows_of(block4, ok, self.block4_dim)
            # Cached fine-tuning's flip augmentation; the mirror images' features are not kept.
            mirrored = ok & (np.asarray(batch["split"]) == FLIPPED_SPLIT)
            flipped = self.run_model(images[:, :, ::-1], mirrored)
            batch["block4_flipped"] = _rows_of(None if flipped is None else flipped[0], mirrored, self.block4_dim)
        batch["features"] = _rows_of(outputs, ok, self.feature_dim)


class FeatureSink(CommittingSink):
    """Commits each block: its good rows into ``<split>/<part>.parquet`` (with ``block4_dim``
    also the block-4 cache into ``block4/<split>/``), then its ledger entry."""

    def __init__(self, output: str, run_id: str, dim: int, block4_dim: int | None = None,
                 block4_dtype: str = BLOCK4_DTYPE):
        super().__init__(output, run_id)
        self.dim = dim
        self.block4_dim = block4_dim
        self.block4_dtype = block4_dtype

    def write_block(self, part: str, batch: dict[str, np.ndarray], ok: np.ndarray) -> None:
        splits = np.asarray([str(s) for s in batch["split"]])
        for split in sorted(set(splits[ok])):
            rows = ok & (splits == split)
            self._write(storage.join(self.output, split, f"{part}.parquet"), batch, rows, self.dim, ["features"])
            if self.block4_dim is not None:
                columns = ["block4", "block4_flipped"] if split == FLIPPED_SPLIT else ["block4"]
                self._write(storage.join(self.output, BLOCK4_DIR, split, f"{part}.parquet"), batch, rows,
                            self.block4_dim, columns, self.block4_dtype)

    @staticmethod
    def _write(uri: str, batch: dict[str, np.ndarray], rows: np.ndarray, dim: int, columns: list[str],
               dtype: str = "float32") -> None:
        data: dict[str, Any] = {
            "path": [str(p) for p in batch["relpath"][rows]],
            "label": pa.array(batch["label"][rows].astype(np.int32)),
            "class_name": [str(c) for c in batch["class_name"][rows]],
        }
        for column in columns:
            values = np.ascontiguousarray(np.stack(batch[column][rows]), dtype=dtype)
            data[column] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)
        storage.write_parquet(uri, pa.table(data, schema=feature_schema(dim, columns, dtype)))


def extraction_settings(cfg: ExtractConfig, weights: WeightsSource) -> dict[str, Any]:
    """What decides an extraction's rows: its options (the *requested* precision, so "auto" on other
    hardware is the same extraction) and the weights' checksum. Not the data root's files (a rerun
    updates the output) nor the block-4 cache (an output with it is a superset of one without)."""
    return job_settings(cfg, drop=("data_dir", "weights", "cache_block4", "workers", "gpus", "batch_size",
                                   "block_files", "max_reject_fraction"),
                        weights_sha256=weights.sha256, preprocessing=weights.preprocessing)


def _begin(output_dir: str, settings: dict[str, Any], cfg: ExtractConfig) -> tuple[dict[str, Any] | None, str | None]:
    """(the finished manifest, the block-4 cache's dtype; each or None) after refusing an ``output_dir`` of
    other settings. An output keeps its cache's dtype (older ones: float32), so its parts stay one schema."""
    record, manifest = ledger.open_output(output_dir, OUTPUT_LAYOUT, settings, cfg.overwrite)
    if record is None:
        return None, BLOCK4_DTYPE if cfg.cache_block4 else None
    if cfg.cache_block4 and not record["cache_block4"]:
        # The same extraction plus the cache: redoing it replaces the folder with a superset.
        log.info(f"re-extracting {output_dir} to add the block-4 cache (--cache-block4)")
        outputs.prepare(output_dir, OUTPUT_LAYOUT, overwrite=True)
        return None, BLOCK4_DTYPE
    return manifest, record.get("block4_dtype", "float32") if record["cache_block4"] else None


def run_extraction(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract features for every image of the data root into ``cfg.output_dir``; return the manifest.
    A finished output with the same settings is reused, or updated when the data root changed; an
    unfinished one is resumed; one with other settings is refused, naming them, unless ``cfg.overwrite``."""
    started = time.time()
    data_dir, synthetic, output_dir, _ = resolve_data(cfg, "features", listed=False)
    index, shared_files = discover_on_this_node(data_dir, cfg)
    listed_s = time.time() - started
    log.info(f"listed {len(index.files)} files under {data_dir} in {listed_s:.1f}s")
    if index.ignored:
        kinds = ", ".join(f"{ext or 'no extension'} {n}" for ext, n in index.ignored.items())
        log.warning(f"ignored {sum(index.ignored.values())} files whose names are not image names ({kinds}); "
                    f"only {', '.join(sorted(IMAGE_EXTENSIONS))} are read")
    weights = resolve_weights(cfg.weights, cfg.preprocessing)
    settings = extraction_settings(cfg, weights)
    inputs = index.fingerprint()
    # What the manifest says of this run besides what finishing it finds.
    about = {"weights": {"source": weights.name, "sha256": weights.sha256}, "preprocessing": weights.preprocessing,
             "fingerprint": fingerprint({**settings, "inputs": inputs}), "synthetic": synthetic,
             "data_dir": storage.absolute(data_dir), "output_dir": output_dir, "listing_s": round(listed_s, 2),
             "ignored_by_extension": index.ignored, "excluded": index.excluded}
    with locks.output_lock(output_dir):
        previous, cache = _begin(output_dir, settings, cfg)
        return commit_run(
            output_dir, previous, inputs=inputs, marker=storage.MANIFEST, what="extraction",
            record={"settings": settings, "cache_block4": cache is not None, "block4_dtype": cache},
            reused=f"extraction in {output_dir} (same settings and inputs; --overwrite redoes it)",
            config=(storage.join(output_dir, CONFIG_FILE), "extract_features", resolved(cfg, output_dir=output_dir)),
            listing=index.files, listing_ref=shared_files,
            folders=SPLITS + ([storage.join(BLOCK4_DIR, s) for s in SPLITS] if cache else []),
            process=lambda todo, run_id, ref: _infer(cfg, index.root, todo, weights, output_dir, cache, run_id, ref),
            finish=lambda live, done: _finish(cfg, index, output_dir, cache, previous, about, live, done),
            started=started)


def _finish(cfg: ExtractConfig, index: DatasetIndex, output: str, cache: str | None, previous: dict[str, Any] | None,
            about: dict[str, Any], live: pa.Table,
            done: tuple[InferencePlan, Tally] | None) -> tuple[dict[str, Any], str]:
    """Audit ``output``, now up to date with ``index`` (``live``: its ledger; ``done``: what ``_infer`` returned,
    if it ran), and finish it; its manifest (``about`` added) and where that goes."""
    plan, tally = done or (None, Tally())
    rejects, counts = _audit(output, index, live, cache)
    check_reject_fraction(rejects, len(index.files), cfg.max_reject_fraction,
                          "The output stays unfinished: fix or remove the files and rerun (only they are redone), "
                          "or raise --max-reject-fraction")
    storage.write_parquet(storage.join(output, REJECTS_FILE), rejects)
    ledger.consolidate(output, live)
    shape, block4_shape = vgg16.feature_shape(cfg.image_size), vgg16.block4_shape(cfg.image_size)
    return {
        "kind": "features", "classes": index.classes, "layout": index.layout, "counts": counts,
        "num_images": sum(sum(c.values()) for c in counts.values()), "num_rejects": len(rejects),
        "rejects_by_reason": dict(Counter(rejects.column("reason").to_pylist())),
        "image_size": cfg.image_size, **tally.report((previous or {}).get("precision", cfg.precision)),
        "precision_requested": cfg.precision,
        "feature_shape": list(shape), "feature_column": f"fixed_size_list<float32>[{int(np.prod(shape))}]",
        "block4": {"dir": BLOCK4_DIR, "shape": list(block4_shape), "flipped_split": FLIPPED_SPLIT,
                   "columns": ["block4", "block4_flipped"], "dtype": cache} if cache else None,
        "inference": asdict(plan) if plan else None, "driver_node": ray.get_runtime_context().get_node_id()[:12],
        "config": asdict(cfg), "versions": library_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **about,
    }, storage.join(output, storage.MANIFEST)


def _infer(cfg: ExtractConfig, root: str, todo: pa.Table, weights: WeightsSource, output: str, cache: str | None,
           run_id: str, todo_ref: ray.ObjectRef | None) -> tuple[InferencePlan, Tally]:
    """Decode and run VGG16 over the ``todo`` files (``todo_ref``: they are in the object store already),
    committing block by block into ``output``."""
    plan = plan_inference(cfg)
    # Listed class by class, the files would make one-class shards; a seeded order mixes
    # them, so a reader that streams shards (cached fine-tuning) needs no global shuffle.
    order = np.random.default_rng(ROW_ORDER_SEED).permutation(len(todo))
    # A task on this node, not the driver, puts the weights into the object store: the driver holds only paths.
    arrays = ray.remote(load_weight_arrays).options(num_cpus=0, **pin_to_this_node(".")).remote(weights, cfg.image_size)
    ds = decoded_images(todo, root, cfg.image_size, plan.decode_cpus, cfg.block_files, order, cfg.max_pixels, todo_ref)
    ds = map_with_actors(ds, FeatureActor, {
        "image_size": cfg.image_size, "weight_arrays": arrays,
        "preprocessing": weights.preprocessing, "precision": cfg.precision, "batch_size": cfg.batch_size,
        "cache_block4": cache is not None,
    }, plan, cfg.batch_size, cfg.block_files)
    dim, block4_dim = (int(np.prod(s)) for s in (vgg16.feature_shape(cfg.image_size), vgg16.block4_shape(cfg.image_size)))
    return plan, FeatureSink(output, run_id, dim, block4_dim if cache else None, cache or "float32").commit(ds)


def _audit(output: str, index: DatasetIndex, live: pa.Table, cache: str | None) -> tuple[pa.Table, dict[str, dict[str, int]]]:
    """Check that every decoded file of the ledger (``ledger.refresh`` checked it against the listing) is
    in exactly one shard, and of the block-4 cache if any; return the rejects and counts per split and class."""
    folders = {split: split for split in index.split_names}
    if cache:
        folders.update({storage.join(BLOCK4_DIR, split): split for split in index.split_names})
    ledger.check_shards(output, live, folders)
    good = live.filter(pc.equal(live.column("reason"), ""))
    kept = index.files.join(good.select(["relpath", "split"]), ["relpath", "split"], join_type="left semi")
    return ledger.rejects(live).cast(REJECT_SCHEMA), index.counts(kept)
