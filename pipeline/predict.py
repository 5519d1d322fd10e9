"""Batch prediction: any trained classifier over image files, decoded by Ray Data tasks and
run by an actor pool (one actor per GPU, or fractional-CPU actors), the model loaded once per actor.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterator

import numpy as np
import ray

from pipeline.cluster import InferencePlan, configure_tensorflow_devices
from pipeline.extract import decoded_images, map_with_actors, run_model_on_good_rows


class ClassifierActor:
    """A Ray Data actor holding one classifier; adds a ``probs`` column (n, classes) to each batch."""

    def __init__(self, model_bytes: bytes, precision: str, batch_size: int):
        configure_tensorflow_devices()
        from pipeline.modelfile import load_classifier

        if isinstance(model_bytes, ray.ObjectRef):
            model_bytes = ray.get(model_bytes)
        # The model travels as bytes through the object store: actors on other nodes
        # cannot see the driver's file system.
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            with open(path, "wb") as f:
                f.write(model_bytes)
            self.model, meta = load_classifier(path, precision)
        self.num_classes = len(meta["classes"])
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.models import probabilities

        images = batch.pop("image")
        ok = batch["reason"] == ""
        out = np.full((len(images), self.num_classes), np.nan, dtype=np.float32)
        raw = run_model_on_good_rows(self.model.predict_on_batch, images, ok, self.batch_size)
        if raw is not None:
            out[ok] = probabilities(raw, self.num_classes)
        batch["probs"] = out
        return batch


def predictions_dataset(model_path: str, rows: list[dict[str, Any]], image_size: int, precision: str,
                        plan: InferencePlan, batch_size: int) -> ray.data.Dataset:
    """A dataset of ``rows`` plus ``probs``, ``reason`` and ``error`` (rows keep their other columns)."""
    with open(model_path, "rb") as f:
        model_ref = ray.put(f.read())
    ds = decoded_images(rows, image_size, batch_size, plan.decode_cpus)
    return map_with_actors(ds, ClassifierActor, {"model_bytes": model_ref, "precision": precision,
                                                 "batch_size": batch_size}, plan, batch_size)


def iter_prediction_batches(ds: ray.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """Stream a predictions dataset to the driver batch by batch (only paths and probabilities)."""
    yield from ds.iter_batches(batch_size=256, batch_format="numpy")


def collect_probabilities(ds: ray.data.Dataset) -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    """(paths of decoded files, their probabilities, rejects) from a predictions dataset."""
    paths: list[str] = []
    probs: list[np.ndarray] = []
    rejects: list[dict[str, str]] = []
    for batch in iter_prediction_batches(ds):
        ok = batch["reason"] == ""
        paths += [str(p) for p in batch["relpath"][ok]]
        probs.append(np.asarray(batch["probs"][ok], dtype=np.float32))
        rejects += [{"path": str(p), "reason": str(r), "error": str(e)}
                    for p, r, e in zip(batch["relpath"][~ok], batch["reason"][~ok], batch["error"][~ok])]
    matrix = np.concatenate(probs) if probs else np.zeros((0, 0), np.float32)
    return paths, matrix, rejects
