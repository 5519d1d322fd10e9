"""The ``train_top`` job: the reference article's top MLP on VGG16 feature shards, exported joined
to its VGG16 base as one image → class model."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from pipeline.batch.evaluation import evaluate
from pipeline.batch.extract import run_extraction
from pipeline.config import ExtractConfig, TrainTopConfig
from pipeline.data import outputs, storage
from pipeline.data.shards import features_as_array
from pipeline.errors import DataError
from pipeline.nets.weights import load_weight_arrays, resolve_weights
from pipeline.training.batches import read_shards
from pipeline.training.checkpoints import load_checkpoint_weights
from pipeline.training.jobs import finish, loop_settings, prepare, run, split_rows


def finished_features(features_dir: str) -> dict[str, Any]:
    """The manifest of a finished extraction; DataError for a folder an extraction has not finished
    (interrupted, or being updated), whose shards are not a consistent set."""
    location = storage.join(features_dir, storage.MANIFEST)
    if not storage.exists(location):
        raise DataError(f"{features_dir} is not a finished extraction (it has no {storage.MANIFEST}): an extraction "
                        f"into it was interrupted or is updating it; rerun jobs.extract_features to finish it")
    return storage.read_json(location)


def default_features(output_dir: str | None) -> str:
    """Extract the built-in data set (reused when already extracted) and return its feature folder."""
    cfg = ExtractConfig(output_dir=storage.join(output_dir, "features") if output_dir else None)
    return run_extraction(cfg)["output_dir"]


def _feature_datasets(features_dir: str, seed: int, held: bool) -> dict[str, Any]:
    """The top MLP's training and validation datasets, which each worker holds whole when ``held``."""
    # The path gives held data an order that does not depend on how Ray read it. Other columns
    # stay unread: an older extraction's train shards may also hold features_flipped.
    columns = ["path", "label", "features"]
    datasets = {split: read_shards(storage.join(features_dir, split), columns) for split in ("train", "validation")}
    if not held:
        train = datasets["train"]
        first = storage.list_parquet(storage.join(features_dir, "train"))[:1]
        if first and len(set(storage.read_parquet(first[0], ["label"]).column("label").to_pylist())) > 1:
            # Shards that mix the classes (extraction writes rows in a seeded order) need only a block order
            # and the local buffer: a global shuffle moved every feature through the object store each epoch.
            datasets["train"] = train.randomize_block_order(seed=seed)
        else:
            # An older extraction's class-by-class shards: a seeded global shuffle mixes them.
            datasets["train"] = train.random_shuffle(seed=seed)
    return datasets


def _validation_predictions(top, features_dir: str, shape: tuple[int, ...], num_classes: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The labels of the validation rows and ``top``'s class probabilities for them, read one shard at a
    time: at 25,000 photos the whole split as a table and an array took the driver to 2.9 GiB."""
    from pipeline.nets import models  # Keras (seconds to load): not before the job runs

    labels, probs = [], []
    for part in storage.list_parquet(storage.join(features_dir, "validation")):
        table = storage.read_parquet(part, ["label", "features"])
        labels.append(table.column("label").to_numpy())
        probs.append(models.probabilities(top.predict(features_as_array(table, shape), batch_size=256, verbose=0),
                                          num_classes))
    return np.concatenate(labels), np.concatenate(probs)


@outputs.holding_locks
def train_top(cfg: TrainTopConfig) -> dict[str, Any]:
    """Fit the top MLP on feature shards; export it joined to its VGG16 base as one image → class model."""
    from pipeline.nets import models  # Keras (seconds to load): not before the job runs

    started = time.monotonic()
    features_dir = cfg.features_dir or default_features(cfg.output_dir)
    manifest = finished_features(features_dir)
    output_dir = cfg.output_dir or os.path.join("outputs", storage.basename(manifest["data_dir"]))
    job, reused = prepare(cfg, "train_top", output_dir, started, ("features_dir",), features=manifest["fingerprint"])
    if reused:
        return reused
    # The exported model must carry the weights the features came from: checked before training.
    source = resolve_weights(manifest["weights"]["source"], manifest["preprocessing"])
    if source.sha256 != manifest["weights"]["sha256"]:
        raise DataError(f"the weights {source.name} (sha256 {source.sha256}) differ from those the features were "
                        f"extracted with ({manifest['weights']['sha256']}); re-extract the features")
    num_classes = len(manifest["classes"])
    shape = tuple(manifest["feature_shape"])
    rows = split_rows(manifest, "train")
    settings = loop_settings(cfg, num_classes, rows, (rows + split_rows(manifest, "validation")) * np.prod(shape) * 4,
                             feature_shape=shape)
    trained = run(job, settings, _feature_datasets(features_dir, cfg.seed, settings.hold_in_memory), cfg)

    top = models.top_classifier(shape, num_classes, "float32", dropout=cfg.dropout)
    load_checkpoint_weights(trained.best, top)
    evaluation = evaluate(*_validation_predictions(top, features_dir, shape, num_classes), manifest["classes"])

    features = models.feature_extractor(manifest["image_size"], load_weight_arrays(source, manifest["image_size"]),
                                        manifest["preprocessing"], "float32")
    model = models.image_classifier(features, top, name="vgg16_bottleneck_classifier")
    metadata = {"classes": manifest["classes"], "image_size": manifest["image_size"],
                "weights": manifest["weights"], "preprocessing": manifest["preprocessing"],
                "data_dir": manifest["data_dir"], "layout": manifest["layout"],
                "validation_fraction": manifest["config"]["validation_fraction"],
                "features_dir": storage.absolute(features_dir),
                "synthetic": manifest.get("synthetic", False)}
    return finish(job, model, metadata, trained, evaluation)
