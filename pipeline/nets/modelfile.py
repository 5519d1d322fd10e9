"""Saving and loading trained classifiers as single ``.keras`` files (local or any URI
``pipeline.data.storage`` reads) that carry their own metadata (classes, image size, weights,
preprocessing, kind) as ``classifier.json`` beside Keras' files, so one file is all that prediction
needs. Models are always loaded in Keras' safe mode (no arbitrary code from lambdas).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from typing import Any

import pyarrow as pa

from pipeline.data import storage
from pipeline.errors import UserError
from pipeline.nets.precision import keras_policy

METADATA_NAME = "classifier.json"
MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
MODEL_KINDS = ("top", "finetune", "scratch")
# Layers pinned to float32 on purpose (input normalisation, the output probabilities).
_FLOAT32_LAYERS = {"preprocessing", "predictions"}


class ModelFileError(UserError):
    """A model file that is missing, not a .keras archive, or lacks the classifier metadata."""


def save_classifier(model, path: str, metadata: dict[str, Any]) -> None:
    """Save ``model`` (built under float32) to ``path`` (local or URI) with ``metadata`` inside;
    the file appears whole or not at all."""
    missing = {"kind", "classes", "image_size"} - metadata.keys()
    if missing:
        raise ValueError(f"classifier metadata lacks {sorted(missing)}")
    with tempfile.TemporaryDirectory(prefix="ric-model-") as tmp_dir:
        tmp = os.path.join(tmp_dir, MODEL_FILE)
        model.save(tmp, overwrite=True)
        with zipfile.ZipFile(tmp, "a") as z:
            z.writestr(METADATA_NAME, json.dumps(metadata, indent=2))
        storage.upload_file(tmp, path)


def export_saved_model(model, uri: str, image_size: int) -> None:
    """Export ``model`` as a TensorFlow SavedModel at ``uri`` for serving (TF Serving, ``tf.saved_model.load``):
    its ``serve`` signature takes ``images``, uint8 of shape (n, image_size, image_size, 3), and returns
    what the model returns (class probabilities)."""
    # Deferred: TensorFlow takes seconds to load, and a job's command line and driver need not.
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serve", fn=lambda images: model(tf.cast(images, tf.float32), training=False),
                         input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.uint8, name="images")])
    with tempfile.TemporaryDirectory(prefix="ric-export-") as tmp:
        archive.write_out(os.path.join(tmp, "saved_model"), verbose=False)
        storage.upload_dir(os.path.join(tmp, "saved_model"), uri)


def read_metadata(path: str) -> dict[str, Any]:
    """The classifier metadata of a ``.keras`` file (local or URI); a clear error when it is not one of ours.
    Reads the archive's directory and its metadata entry, not the whole model."""
    problem = storage.describe_problem(path, "file")
    if problem:
        raise ModelFileError(f"model file {path!r} cannot be used: {problem}")
    filesystem, name = storage.split_uri(path)
    # A seekable file, not its bytes: zipfile reads the directory and one entry, not the (remote, large) weights.
    with filesystem.open_input_file(name) as f:
        return metadata_in(f, path)


def metadata_in(archive: Any, path: str) -> dict[str, Any]:
    """The classifier metadata in ``archive`` (a ``.keras`` file's bytes or a seekable file of it),
    read from ``path``; a clear error when it is not one of ours."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive) if isinstance(archive, bytes) else archive) as z:
            if METADATA_NAME not in z.namelist():
                raise ModelFileError(f"{path} is a Keras file without classifier metadata ({METADATA_NAME}); use a "
                                     f"model written by jobs.train_top, jobs.finetune or jobs.train_scratch")
            meta = json.loads(z.read(METADATA_NAME))
    # pyarrow's files refuse zipfile's seek to the end record of a file too short to hold one with
    # ArrowInvalid, where Python's raise the OSError that zipfile turns into BadZipFile.
    except (zipfile.BadZipFile, pa.ArrowInvalid) as exc:
        raise ModelFileError(f"{path} is not a .keras model file (not a zip archive)") from exc
    if meta.get("kind") not in MODEL_KINDS:
        raise ModelFileError(f"{path} has an unknown model kind {meta.get('kind')!r}; expected one of {MODEL_KINDS}")
    return meta


def with_policy(model, precision: str):
    """A copy of ``model`` (weights included) whose layers compute under Keras' mixed policy of
    ``precision``, the pinned float32 layers excepted; nested models are cloned layer by layer."""
    import keras  # deferred: Keras loads TensorFlow, which a job's command line and driver need not

    policy = keras.DTypePolicy(keras_policy(precision))

    def clone(layer):
        config = layer.get_config()
        if layer.name not in _FLOAT32_LAYERS:
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    mixed = keras.models.clone_model(model, clone_function=clone, recursive=True)
    mixed.set_weights(model.get_weights())
    return mixed


def load_classifier(path: str, precision: str = "float32"):
    """``(model, metadata)`` of a classifier (local or URI), loaded in safe mode; ``bfloat16``/``float16`` rebuild
    it under Keras' mixed policy of that type (``with_policy``)."""
    import keras  # deferred: Keras loads TensorFlow, which a job's command line and driver need not

    meta = read_metadata(path)
    with storage.local_copy(path, ".keras") as local:
        model = keras.saving.load_model(local, safe_mode=True, compile=False)
    if precision in ("bfloat16", "float16"):
        model = with_policy(model, precision)
    return model, meta
