"""Saving and loading trained classifiers as single ``.keras`` files that carry their own metadata.

The metadata (class names, image size, weights source, preprocessing, kind) is
stored as ``classifier.json`` inside the ``.keras`` zip archive, beside Keras' own
files, so one file is all that prediction needs. Models are always loaded in Keras'
safe mode (no arbitrary code from lambdas).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import zipfile
from typing import Any

from pipeline.errors import UserError

METADATA_NAME = "classifier.json"
MODEL_KINDS = ("top", "finetune", "scratch")
# Layers pinned to float32 on purpose (input normalisation, the output probabilities).
_FLOAT32_LAYERS = {"preprocessing", "predictions"}


class ModelFileError(UserError):
    """A model file that is missing, not a .keras archive, or lacks the classifier metadata."""


def save_classifier(model, path: str, metadata: dict[str, Any]) -> None:
    """Save ``model`` (built under float32) to ``path`` with ``metadata`` inside, atomically."""
    missing = {"kind", "classes", "image_size"} - metadata.keys()
    if missing:
        raise ValueError(f"classifier metadata lacks {sorted(missing)}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".keras")
    os.close(fd)
    try:
        model.save(tmp, overwrite=True)
        with zipfile.ZipFile(tmp, "a") as z:
            z.writestr(METADATA_NAME, json.dumps(metadata, indent=2))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_metadata(path: str) -> dict[str, Any]:
    """The classifier metadata of a ``.keras`` file; a clear error when it is not one of ours."""
    if not os.path.isfile(path):
        raise ModelFileError(f"model file {path!r} does not exist")
    try:
        with zipfile.ZipFile(path) as z:
            if METADATA_NAME not in z.namelist():
                raise ModelFileError(
                    f"{path} is a Keras file without classifier metadata ({METADATA_NAME}); use a model "
                    f"written by jobs.train_top, jobs.finetune or jobs.train_scratch"
                )
            meta = json.loads(z.read(METADATA_NAME))
    except zipfile.BadZipFile as exc:
        raise ModelFileError(f"{path} is not a .keras model file (not a zip archive)") from exc
    if meta.get("kind") not in MODEL_KINDS:
        raise ModelFileError(f"{path} has an unknown model kind {meta.get('kind')!r}; expected one of {MODEL_KINDS}")
    return meta


def _with_policy(config: Any, policy: str) -> Any:
    """A copy of a Keras model config whose layers compute under ``policy`` (pinned layers excepted)."""
    config = copy.deepcopy(config)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            cfg = node.get("config")
            dtype = cfg.get("dtype") if isinstance(cfg, dict) else None
            if isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicy" \
                    and cfg.get("name") not in _FLOAT32_LAYERS \
                    and node.get("class_name") not in ("InputLayer", "ImagePreprocessing"):
                cfg["dtype"] = {**dtype, "config": {**dtype.get("config", {}), "name": policy}}
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return config


def load_classifier(path: str, precision: str = "float32"):
    """Load a classifier in safe mode; ``bfloat16`` rebuilds it under ``mixed_bfloat16``.

    Returns ``(model, metadata)``.
    """
    import keras

    import pipeline.models  # noqa: F401 - registers ImagePreprocessing for deserialisation

    meta = read_metadata(path)
    if precision != "bfloat16":
        return keras.saving.load_model(path, safe_mode=True, compile=False), meta
    with zipfile.ZipFile(path) as z:
        config = json.loads(z.read("config.json"))
    model = keras.saving.deserialize_keras_object(_with_policy(config, "mixed_bfloat16"), safe_mode=True)
    model.load_weights(path)
    return model, meta
