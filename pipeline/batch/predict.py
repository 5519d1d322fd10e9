"""Batch prediction: any trained classifier over image files, decoded by Ray Data tasks and
run by an actor pool (one actor per GPU, or fractional-CPU actors), the model loaded once per actor.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import tempfile
import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import ray

from pipeline import names
from pipeline.batch.cluster import InferencePlan
from pipeline.batch.evaluation import evaluate
from pipeline.batch.inference import (
    CommittingSink,
    InferenceActor,
    Tally,
    commit_run,
    decoded_images,
    map_with_actors,
    plan_inference,
)
from pipeline.batch.listing import listed_on_this_node
from pipeline.config import DEFAULT_BLOCK_FILES, OUTPUT_FILE_SUFFIXES, PredictConfig
from pipeline.data import ledger, locks, outputs, storage
from pipeline.data.discover import (
    UNLABELED_SCHEMA,
    check_root,
    columnar,
    discover_unlabeled,
    fingerprint_files,
    is_image_name,
)
from pipeline.data.shards import REJECTS_FILE
from pipeline.errors import DataError, OutputError
from pipeline.images.decode import MAX_PIXELS
from pipeline.nets.modelfile import MODEL_FILE, load_classifier, metadata_in
from pipeline.options import CONFIG_FILE, resolved, write_config
from pipeline.redact import redact_values

PARTS_DIR = "predictions"


class LoadedClassifier(InferenceActor):
    """A classifier file loaded in this process (a prediction actor or a serving replica): its
    model, classes and image size, and probabilities computed in padded batches of one size."""

    def load(self, model_bytes: bytes, precision: str) -> Any:
        # The model travels as bytes: processes on other nodes cannot see the driver's file system.
        with tempfile.TemporaryDirectory(prefix="ric-") as tmp:
            path = os.path.join(tmp, MODEL_FILE)
            with open(path, "wb") as f:
                f.write(model_bytes)
            model, meta = load_classifier(path, precision)
        self.classes, self.image_size = list(meta["classes"]), int(meta["image_size"])
        self.num_classes = len(self.classes)
        return model

    def probabilities(self, images: np.ndarray, ok: np.ndarray | None = None, batch_size: int | None = None) -> np.ndarray:
        """``(n, classes)`` probabilities of ``images``, run in batches padded to ``batch_size``
        (default the one given at load); NaN rows where ``ok`` is False."""
        # Deferred: pipeline.nets.models loads Keras and TensorFlow, which the job's driver need not.
        from pipeline.nets.models import probabilities

        ok = np.ones(len(images), dtype=bool) if ok is None else ok
        out = np.full((len(images), self.num_classes), np.nan, dtype=np.float32)
        raw = self.run_model(images, ok, batch_size)
        if raw is not None:
            out[ok] = probabilities(raw, self.num_classes)
        return out


class ClassifierActor(LoadedClassifier):
    """A Ray Data actor holding one classifier; adds a ``probs`` column (n, classes) to each batch."""

    FAULT_SITE = "predict"

    def infer(self, batch: dict[str, np.ndarray], images: np.ndarray) -> None:
        batch["probs"] = self.probabilities(images, batch["reason"] == "")


def predictions_dataset(model: str | bytes, files: pa.Table, root: str, image_size: int, precision: str,
                        plan: InferencePlan, batch_size: int, block_files: int = DEFAULT_BLOCK_FILES,
                        max_pixels: int = MAX_PIXELS, files_ref: ray.ObjectRef | None = None) -> ray.data.Dataset:
    """A dataset of ``files`` (``relpath`` under ``root``, and any other columns, which rows keep)
    plus ``probs``, ``reason`` and ``error``; ``model`` is a model file's location or bytes; ``files_ref``:
    ``files`` already in the object store."""
    model_ref = ray.put(model if isinstance(model, bytes) else storage.read_bytes(model))
    ds = decoded_images(files, root, image_size, plan.decode_cpus, block_files, max_pixels=max_pixels,
                        files_ref=files_ref)
    return map_with_actors(ds, ClassifierActor, {"model_data": model_ref, "precision": precision,
                                                 "batch_size": batch_size}, plan, batch_size, block_files)


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


def prediction_schema(classes: list[str]) -> pa.Schema:
    """``path``, ``predicted_class``, ``confidence``, then ``prob_<class>`` per class."""
    return pa.schema([("path", pa.string()), ("predicted_class", pa.string()), ("confidence", pa.float32()),
                      *((f"prob_{c}", pa.float32()) for c in classes)])


class PredictionSink(CommittingSink):
    """Commits each block: its predictions to ``predictions/<part>.parquet``, then its ledger entry."""

    def __init__(self, output: str, run_id: str, classes: list[str]):
        super().__init__(output, run_id)
        self.classes = classes

    def write_block(self, part: str, batch: dict[str, np.ndarray], ok: np.ndarray) -> None:
        if ok.any():
            storage.write_parquet(storage.join(self.output, PARTS_DIR, f"{part}.parquet"),
                                  prediction_table(batch["relpath"][ok], np.stack(batch["probs"][ok]), self.classes))


def prediction_table(paths: Sequence[str], probs: np.ndarray, classes: list[str]) -> pa.Table:
    """Rows of predictions: the most probable class, its probability, and every class's probability."""
    probs = np.asarray(probs, dtype=np.float32)
    best = probs.argmax(axis=1)
    columns = {"path": [str(p) for p in paths], "predicted_class": [classes[i] for i in best],
               "confidence": probs[np.arange(len(best)), best]}
    for i, c in enumerate(classes):
        columns[f"prob_{c}"] = probs[:, i]
    return pa.table(columns, schema=prediction_schema(classes))


def list_inputs(spec: str) -> tuple[str, pa.Table]:
    """(root, ``relpath`` and ``stamp`` of every image file) for a folder (recursive) or glob, local or URI."""
    if not any(ch in spec for ch in "*?["):
        return spec, discover_unlabeled(spec)
    parts = spec.split("/")
    first = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    root = "/".join(parts[:first]) or "."
    check_root(root)
    # Local globs too match the listing rather than glob.glob, which went round link loops and
    # gave names that are not UTF-8; the pattern is put in the listing's stored form.
    pattern = names.escape("/".join(parts[first:])).split("/")
    files = columnar(((rel, stamp) for rel, stamp in storage.walk_files(root)
                      if is_image_name(rel) and _glob_matches(pattern, rel.split("/"))), UNLABELED_SCHEMA)
    if not len(files):
        raise DataError(f"no image files match {spec!r}")
    return root, files


def _listed_inputs(spec: str) -> tuple[pa.Table, str]:
    """``list_inputs(spec)`` as the ledger takes it: the files with an empty ``split``, and the root."""
    root, files = list_inputs(spec)
    return files.append_column("split", pa.array([""] * len(files), pa.string())), root


def _glob_matches(pattern: list[str], parts: list[str]) -> bool:
    """Whether a path's '/'-separated ``parts`` match a glob's: ``**`` spans folders, ``*``, ``?``
    and ``[…]`` stay within one (as ``glob.glob(recursive=True)`` does on local folders)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        # Last, it takes the rest; between, zero or more folders, leaving the rest their parts.
        return bool(parts) if len(pattern) == 1 else any(
            _glob_matches(pattern[1:], parts[i:]) for i in range(len(parts)))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_matches(pattern[1:], parts[1:])


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


SUMMARY = "summary.json"
OUTPUT_LAYOUT = outputs.Layout("a prediction", markers=(ledger.RUN_FILE, SUMMARY),
                               files=(*ledger.FILES, REJECTS_FILE, CONFIG_FILE, f"{PARTS_DIR}/part-*"))


def _output_targets(output: str) -> tuple[str, str, bool]:
    """(folder the run commits into, final location, whether that is one file). A folder output
    is its own work folder; a single file is assembled from ``<stem>.partial/`` at the end."""
    stripped = output.rstrip("/")
    if stripped.lower().endswith(OUTPUT_FILE_SUFFIXES):
        return f"{os.path.splitext(stripped)[0]}.partial", stripped, True
    return stripped, stripped, False


def _side_file(final: str, suffix: str) -> str:
    """``<stem><suffix>`` beside a single-file output."""
    return os.path.splitext(final)[0] + suffix


def check_targets(output: str, overwrite: bool) -> None:
    """Refuse (OutputError) an output this project may not write: a folder (or a single file's
    work folder) holding what a prediction does not write (``outputs.check``), or an existing
    single file without the ``<stem>.summary.json`` a prediction writes beside it."""
    problem = storage.describe_output_problem(output)
    if problem:
        raise OutputError(f"--output {output!r} cannot be written: {problem}")
    if storage.is_file(output) and not output.lower().endswith(OUTPUT_FILE_SUFFIXES):
        raise OutputError(f"--output {output!r} is an existing file; give a folder or a .parquet/.csv name")
    work, final, single = _output_targets(output)
    outputs.check(work, OUTPUT_LAYOUT)
    summary = _side_file(final, ".summary.json")
    written = [final, _side_file(final, ".rejects.parquet"), _side_file(final, ".config.yaml"), summary] if single else []
    existing = [storage.basename(p) for p in written if storage.exists(p)]
    if existing:
        if not overwrite:
            raise OutputError(f"{', '.join(existing)} exist(s) beside {final}; pass --overwrite to replace them")
        if not storage.is_file(summary):
            raise OutputError(f"{', '.join(existing)} exist(s) but no {storage.basename(summary)}, which a "
                              f"prediction of this project writes: not replaced; nothing was deleted. Choose "
                              f"another output name")


def run_prediction(cfg: PredictConfig) -> dict[str, Any]:
    """Classify every image under ``cfg.input``, one row per decodable file; returns a summary. Commits
    block by block: a rerun with the same model and input resumes an interrupted run or updates a finished
    folder output (added and changed files, removed ones dropped); a single file needs --overwrite."""
    started = time.time()
    model = storage.read_bytes(cfg.model)  # read once: its metadata, its hash and the actors' copy
    meta = metadata_in(model, cfg.model)
    files, files_ref, root = listed_on_this_node(_listed_inputs, cfg.input)
    settings = redact_values({"model_sha256": hashlib.sha256(model).hexdigest(), "input": storage.absolute(cfg.input),
                              "precision": cfg.precision, "max_pixels": cfg.max_pixels})
    inputs = fingerprint_files(files)
    work, final, single = _output_targets(cfg.output)
    with locks.output_lock(final):
        check_targets(cfg.output, cfg.overwrite)
        _, finished = ledger.open_output(work, OUTPUT_LAYOUT, settings, cfg.overwrite, marker=SUMMARY)
        return commit_run(
            work, finished, inputs=inputs, record={"settings": settings}, marker=SUMMARY, what="predictions",
            reused=f"predictions in {final} (same model and inputs; --overwrite redoes them)",
            config=None if single else (storage.join(work, CONFIG_FILE), "predict", resolved(cfg)),
            listing=files, listing_ref=files_ref, folders=[PARTS_DIR],
            process=lambda todo, run_id, ref: _predict(cfg, model, meta, todo, root, work, run_id, ref),
            finish=lambda live, tally: _commit(cfg, meta, work, final, single, live, tally or Tally()),
            started=started)


def _predict(cfg: PredictConfig, model: bytes, meta: dict[str, Any], todo: pa.Table, root: str, work: str,
             run_id: str, todo_ref: ray.ObjectRef | None) -> Tally:
    """Run the classifier over the ``todo`` files (``todo_ref``: they are in the object store already),
    committing block by block into ``work``."""
    ds = predictions_dataset(model, todo, root, meta["image_size"], cfg.precision, plan_inference(cfg), cfg.batch_size,
                             cfg.block_files, cfg.max_pixels, todo_ref)
    return PredictionSink(work, run_id, meta["classes"]).commit(ds)


def _summary(cfg: PredictConfig, meta: dict[str, Any], final: str, table: pa.Table, rejects: pa.Table,
             tally: Tally) -> dict[str, Any]:
    """What a prediction run tells: counts, who ran it, and the evaluation when folders name the classes."""
    classes = meta["classes"]
    summary: dict[str, Any] = {"model": cfg.model, "kind": meta["kind"], "input": cfg.input, "output": final,
                               "num_images": len(table), "num_rejects": len(rejects), **tally.report(cfg.precision),
                               "driver_node": ray.get_runtime_context().get_node_id()[:12]}
    paths = table.column("path").to_pylist()
    labels = _true_labels(paths, classes) if paths else None
    if labels is not None:
        probs = np.stack([table.column(f"prob_{c}").to_numpy() for c in classes], axis=1)
        summary["evaluation"] = evaluate(labels, probs, classes)
    return summary


def _commit(cfg: PredictConfig, meta: dict[str, Any], work: str, final: str, single: bool, live: pa.Table,
            tally: Tally) -> tuple[dict[str, Any], str]:
    """Check that each decoded file has exactly one prediction and finish the output; its summary and where that
    goes. A folder keeps its parts and ledger (for the next update); a single file is written whole (sorted by
    path) beside its rejects and config, and its work folder goes."""
    ledger.check_shards(work, live, {PARTS_DIR: ""})
    table = storage.read_parquet_files(storage.list_parquet(storage.join(work, PARTS_DIR)))
    table = (table if table is not None else prediction_schema(meta["classes"]).empty_table()).sort_by("path")
    rejects = ledger.rejects(live).drop_columns(["split"])
    summary = _summary(cfg, meta, final, table, rejects, tally)
    if not single:
        storage.write_parquet(storage.join(work, REJECTS_FILE), rejects)
        ledger.consolidate(work, live)
        return summary, storage.join(final, SUMMARY)
    storage.write_parquet(_side_file(final, ".rejects.parquet"), rejects)
    (storage.write_csv if final.lower().endswith(".csv") else storage.write_parquet)(final, table)
    storage.delete_dir(work)
    # Beside the file only once it is there: an interrupted run leaves nothing beside it.
    write_config(_side_file(final, ".config.yaml"), "predict", resolved(cfg))
    return summary, _side_file(final, ".summary.json")
