"""Batch prediction: any trained classifier over image files, decoded by Ray Data tasks and
run by an actor pool (one actor per GPU, or fractional-CPU actors), the model loaded once per actor.
"""

from __future__ import annotations

import glob
import io
import os
import re
import time
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import ray

from pipeline import storage
from pipeline.cluster import InferencePlan, configure_tensorflow_devices, pin_to_this_node
from pipeline.config import OUTPUT_FILE_SUFFIXES, PredictConfig
from pipeline.discover import check_root, discover_unlabeled, is_image_name
from pipeline.errors import DataError, OutputError
from pipeline.faults import maybe_kill
from pipeline.extract import (REJECTS_FILE, actor_identity, actors_precision, collect_rejects, decoded_images,
                              map_with_actors, plan_inference, run_model_on_good_rows, TallyingSink,
                              write_rejects_part)

PARTS_DIR = "predictions"


class ClassifierActor:
    """A Ray Data actor holding one classifier; adds a ``probs`` column (n, classes) to each batch."""

    def __init__(self, model_bytes: bytes, precision: str, batch_size: int):
        import tempfile

        configure_tensorflow_devices()
        from pipeline.modelfile import MODEL_FILE, load_classifier
        from pipeline.precision import device_precision

        if isinstance(model_bytes, ray.ObjectRef):
            model_bytes = ray.get(model_bytes)
        precision = device_precision(precision)
        # The model travels as bytes through the object store: actors on other nodes
        # cannot see the driver's file system.
        with tempfile.TemporaryDirectory(prefix="ric-") as tmp:
            path = os.path.join(tmp, MODEL_FILE)
            with open(path, "wb") as f:
                f.write(model_bytes)
            self.model, meta = load_classifier(path, precision)
        self.num_classes = len(meta["classes"])
        self.batch_size = batch_size
        self.identity = actor_identity(precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.models import probabilities

        maybe_kill("predict")
        images = batch.pop("image")
        ok = batch["reason"] == ""
        out = np.full((len(images), self.num_classes), np.nan, dtype=np.float32)
        raw = run_model_on_good_rows(self.model.predict_on_batch, images, ok, self.batch_size)
        if raw is not None:
            out[ok] = probabilities(raw, self.num_classes)
        batch["probs"] = out
        batch["actor"] = np.full(len(images), self.identity, dtype=object)
        return batch


def predictions_dataset(model_path: str, rows: list[dict[str, Any]], image_size: int, precision: str,
                        plan: InferencePlan, batch_size: int) -> ray.data.Dataset:
    """A dataset of ``rows`` plus ``probs``, ``reason`` and ``error`` (rows keep their other columns)."""
    model_ref = ray.put(storage.read_bytes(model_path))
    ds = decoded_images(rows, image_size, batch_size, plan.decode_cpus)
    return map_with_actors(ds, ClassifierActor, {"model_bytes": model_ref, "precision": precision,
                                                 "batch_size": batch_size}, plan, batch_size)


def collect_probabilities(ds: ray.data.Dataset) -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    """(paths of decoded files, their probabilities, rejects) from a predictions dataset."""
    paths: list[str] = []
    probs: list[np.ndarray] = []
    rejects: list[dict[str, str]] = []
    # Streamed batch by batch: the driver keeps only paths and probabilities, never pixels.
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        ok = batch["reason"] == ""
        paths += [str(p) for p in batch["relpath"][ok]]
        probs.append(np.asarray(batch["probs"][ok], dtype=np.float32))
        rejects += [{"path": str(p), "reason": str(r), "error": str(e)}
                    for p, r, e in zip(batch["relpath"][~ok], batch["reason"][~ok], batch["error"][~ok])]
    matrix = np.concatenate(probs) if probs else np.zeros((0, 0), np.float32)
    return paths, matrix, rejects


PREDICTION_BASE = [("path", pa.string()), ("predicted_class", pa.string()), ("confidence", pa.float32())]


def prediction_schema(classes: list[str]) -> pa.Schema:
    """``path``, ``predicted_class``, ``confidence``, then ``prob_<class>`` per class."""
    return pa.schema(PREDICTION_BASE + [(f"prob_{c}", pa.float32()) for c in classes])


class PredictionSink(TallyingSink):
    """Writes each block's predictions to ``part-*.parquet`` and its undecodable files to ``_rejects/``."""

    def __init__(self, staging: str, classes: list[str]):
        self.staging = staging
        self.classes = classes

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Counter[str]]:
        from ray.data.block import BlockAccessor

        tally = self.empty_tally()
        for n, block in enumerate(blocks):
            batch = BlockAccessor.for_block(block).to_numpy()
            if len(batch["relpath"]) == 0:
                continue
            name = f"part-{ctx.task_idx:05d}-{n:04d}.parquet"
            self.count(tally, batch)
            ok = write_rejects_part(self.staging, name, batch)
            if ok.any():
                storage.write_parquet(storage.join(self.staging, PARTS_DIR, name),
                                      prediction_table(batch["relpath"][ok], np.stack(batch["probs"][ok]), self.classes))
        return tally


def prediction_table(paths: Sequence[str], probs: np.ndarray, classes: list[str]) -> pa.Table:
    """Rows of predictions: the most probable class, its probability, and every class's probability."""
    probs = np.asarray(probs, dtype=np.float32)
    best = probs.argmax(axis=1)
    columns = {"path": [str(p) for p in paths], "predicted_class": [classes[i] for i in best],
               "confidence": probs[np.arange(len(best)), best]}
    for i, c in enumerate(classes):
        columns[f"prob_{c}"] = probs[:, i]
    return pa.table(columns, schema=prediction_schema(classes))


def list_inputs(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """(root, [(path, path relative to root)]) for a folder (recursive) or a glob, local or URI;
    paths in the output are relative to root."""
    if not any(ch in spec for ch in "*?["):
        return spec, discover_unlabeled(spec)
    parts = spec.split("/")
    first = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    root = "/".join(parts[:first]) or "."
    if storage.is_local(root):
        files = sorted(p for p in glob.glob(spec, recursive=True) if is_image_name(p) and not os.path.isdir(p))
        files = [(p, os.path.relpath(p, root)) for p in files]
    else:
        check_root(root)
        pattern = _glob_regex("/".join(parts[first:]))
        files = [(storage.join(root, rel), rel) for rel, _ in storage.walk_files(root)
                 if is_image_name(rel) and pattern.fullmatch(rel)]
    if not files:
        raise DataError(f"no image files match {spec!r}")
    return root, files


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over '/'-separated paths as a regex: ``**`` spans folders, ``*``, ``?`` and ``[…]``
    stay within one (as ``glob.glob(recursive=True)`` does on local folders)."""
    parts = pattern.split("/")
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        for token in re.findall(r"\[[^\]]*\]|.", part):
            out.append({"*": "[^/]*", "?": "[^/]"}.get(token, token if token.startswith("[") and len(token) > 1
                                                        else re.escape(token)))
        out.append("" if last else "/")
    return re.compile("".join(out))


def _true_labels(paths: list[str], classes: list[str]) -> np.ndarray | None:
    """Labels from the first folder of each path when every path sits under a class-named folder."""
    index = {c: i for i, c in enumerate(classes)}
    labels = []
    for p in paths:
        top = p.replace("\\", "/").split("/", 1)[0]
        if top not in index or "/" not in p:
            return None
        labels.append(index[top])
    return np.array(labels)


def _output_targets(output: str) -> tuple[str, str, str]:
    """(staging folder, final predictions location, final rejects file) for a file or folder output."""
    stripped = output.rstrip("/")
    if output.lower().endswith(OUTPUT_FILE_SUFFIXES):
        stem, _ = os.path.splitext(stripped)
        return f"{stem}.partial", stripped, f"{stem}.rejects.parquet"
    return f"{stripped}.partial", stripped, storage.join(stripped, REJECTS_FILE)


def run_prediction(cfg: PredictConfig) -> dict[str, Any]:
    """Classify every image under ``cfg.input`` and write one row per decodable file; returns a summary."""
    from pipeline.modelfile import read_metadata
    from pipeline.report import evaluate

    started = time.time()
    meta = read_metadata(cfg.model)
    classes = meta["classes"]
    _, files = list_inputs(cfg.input)
    rows = [{"path": p, "relpath": rel} for p, rel in files]
    plan = plan_inference(cfg)
    staging, final, rejects_target = _output_targets(cfg.output)
    single_file = final.lower().endswith(OUTPUT_FILE_SUFFIXES)
    if storage.exists(final) and not cfg.overwrite:
        raise OutputError(f"{final} exists; pass --overwrite to replace it")
    with storage.output_lock(final):
        storage.delete_dir(staging)  # never reuse what an interrupted run half-wrote
        storage.make_dir(staging)
        ds = predictions_dataset(cfg.model, rows, meta["image_size"], cfg.precision, plan, cfg.batch_size)
        sink = PredictionSink(staging, classes)
        ds.write_datasink(sink, ray_remote_args=pin_to_this_node(staging))
        table = storage.read_parquet_files(storage.list_parquet(storage.join(staging, PARTS_DIR)))
        table = (table if table is not None else prediction_schema(classes).empty_table()).sort_by("path")
        rejects = collect_rejects(staging).drop_columns(["split"])
        storage.write_parquet(storage.join(staging, REJECTS_FILE), rejects)
        paths = table.column("path").to_pylist()
        done = set(paths) | set(rejects.column("path").to_pylist())
        if len(paths) != len(set(paths)) or done != {r["relpath"] for r in rows}:
            raise RuntimeError(f"prediction output is inconsistent: {len(paths) - len(set(paths))} duplicated, "
                               f"{len(rows) - len(done)} lost rows")
        summary: dict[str, Any] = {"model": cfg.model, "kind": meta["kind"], "input": cfg.input, "output": final,
                                   "num_images": len(paths), "num_rejects": len(rejects),
                                   "precision": actors_precision(sink.tally["actors"], cfg.precision),
                                   "inference_actors": sink.tally["actors"], "decode_nodes": sink.tally["decode_nodes"],
                                   "driver_node": ray.get_runtime_context().get_node_id()[:12]}
        labels = _true_labels(paths, classes) if paths else None
        if labels is not None:
            probs = np.stack([table.column(f"prob_{c}").to_numpy() for c in classes], axis=1)
            summary["evaluation"] = evaluate(labels, probs, classes)
        _commit(staging, final, rejects_target, table, single_file)
    elapsed = time.time() - started
    summary.update(elapsed_s=round(elapsed, 2), images_per_s=round(len(rows) / max(elapsed, 1e-9), 2))
    summary_path = (os.path.splitext(final)[0] + ".summary.json") if single_file else storage.join(final, "summary.json")
    storage.write_json(summary_path, summary)
    return summary


def _commit(staging: str, final: str, rejects_target: str, table: pa.Table, single_file: bool) -> None:
    """Put the finished predictions in place; a single file is written whole, then renamed."""
    if not single_file:
        storage.commit_dir(staging, final)
        return
    filesystem, path = storage.split_uri(final)
    tmp = storage.join(staging, "output" + os.path.splitext(final)[1])
    if final.lower().endswith(".csv"):
        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        storage.write_bytes(tmp, buf.getvalue())
    else:
        storage.write_parquet(tmp, table)
    storage.move_file(storage.join(staging, REJECTS_FILE), rejects_target)
    storage.move_file(tmp, final)
    storage.delete_dir(staging)
