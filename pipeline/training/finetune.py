"""The ``finetune`` job: VGG16's block 5 and the top, starting from a ``train_top`` model, on the
block-4 cache of the top model's feature folder (the default) or on augmented images
(``--no-cache-block4``); both export the full image → class model."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import ray

from pipeline.batch.extract import run_extraction
from pipeline.config import ExtractConfig, FinetuneConfig
from pipeline.data import outputs, storage
from pipeline.data.discover import DatasetIndex, discover
from pipeline.data.shards import read_split
from pipeline.errors import DataError, UserError
from pipeline.nets import vgg16
from pipeline.nets.modelfile import MODEL_FILE, load_classifier, read_metadata
from pipeline.training.batches import read_shards
from pipeline.training.checkpoints import load_checkpoint_weights
from pipeline.training.jobs import Job, image_job, loop_settings, prepare, split_rows, train_export_evaluate


def _top_model(cfg: FinetuneConfig) -> tuple[str, dict[str, Any]]:
    """The ``train_top`` model fine-tuning starts from: its location and metadata."""
    output_dir = cfg.output_dir
    top_path = cfg.top_model or (storage.join(storage.join(output_dir, "top"), MODEL_FILE) if output_dir else None)
    if top_path is None or not storage.is_file(top_path):
        raise UserError(
            f"fine-tuning needs a trained top model (from a random top the large gradients wreck the pretrained "
            f"filters), and there is none at {top_path or '<output-dir>/top/model.keras'}; make one with "
            f"`python -m jobs.train_top --output-dir {output_dir or 'OUTPUT_DIR'}` or pass --top-model"
        )
    meta = read_metadata(top_path)
    if meta["kind"] != "top":
        raise UserError(f"--top-model {top_path} is a {meta['kind']} model; fine-tuning starts from a train_top model")
    return top_path, meta


@outputs.holding_locks
def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune VGG16's block 5 and the top, starting from a train_top model, on augmented images
    (or, with ``cache_block4``, on cached block-4 outputs of the top model's feature folder)."""
    started = time.monotonic()
    top_path, meta = _top_model(cfg)
    output_dir = cfg.output_dir or storage.parent(storage.parent(storage.absolute(top_path)))
    manifest, index, data = _finetune_data(cfg, meta)
    job, reused = prepare(cfg, "finetune", output_dir, started, ("top_model", "data_dir"),
                          data=manifest["fingerprint"] if manifest else index.fingerprint(),
                          top_model_sha256=hashlib.sha256(storage.read_bytes(top_path)).hexdigest())
    if reused:
        return reused
    top_model, _ = load_classifier(top_path)
    features, top = top_model.get_layer("vgg16_features"), top_model.get_layer("top")
    image_model = _finetuned_image_model(meta, features.get_weights())
    metadata = {"weights": meta["weights"], "preprocessing": meta["preprocessing"],
                "top_model": storage.absolute(top_path), "synthetic": meta.get("synthetic", False),
                "classes": meta["classes"], "image_size": meta["image_size"], "cached_block4": cfg.cache_block4, **data}
    if cfg.cache_block4:
        return _finetune_cached(job, cfg, manifest, features, top, image_model, metadata)
    return image_job(job, cfg, index, meta["image_size"], metadata, image_model,
                     base_weights=ray.put(features.get_weights()), top_weights=ray.put(top.get_weights()))


def _finetuned_image_model(meta: dict[str, Any], base_weights: list[np.ndarray]):
    """A builder of the image → class model fine-tuning exports: VGG16 frozen below block 5 and a
    top; with ``block5_source``, the base weights with block 5 taken from that model."""
    from pipeline.nets import models  # Keras (seconds to load): not before the job runs

    image_size, classes = meta["image_size"], meta["classes"]
    shape = tuple(vgg16.feature_shape(image_size))

    def build(block5_source=None):
        f = models.feature_extractor(image_size, base_weights if block5_source else None, meta["preprocessing"],
                                     "float32")
        if block5_source is not None:
            models.copy_block5(block5_source, f)
        models.freeze_below_block5(f)
        return models.image_classifier(f, models.top_classifier(shape, len(classes), "float32"), name="vgg16_finetuned")

    return build


def _finetune_cached(job: Job, cfg: FinetuneConfig, manifest: dict[str, Any], features, top, image_model,
                     metadata: dict[str, Any]) -> dict[str, Any]:
    """Fine-tuning on the block-4 cache of the top model's feature folder (``--cache-block4``), from the top
    model's ``features`` and ``top``; ``image_model`` builds the export."""
    from pipeline.nets import models  # Keras (seconds to load): not before the job runs

    classes, image_size = metadata["classes"], metadata["image_size"]
    block4_shape = tuple(manifest["block4"]["shape"])
    cache = storage.join(metadata["features_dir"], manifest["block4"]["dir"])
    # Extraction's shards already mix the classes: streamed, a per-epoch block order plus the local
    # shuffle buffer suffice; held, the cache is reshuffled in memory every epoch.
    datasets = {"train": read_shards(storage.join(cache, "train"), ["path", "label", "block4", "block4_flipped"])
                .randomize_block_order(seed=cfg.seed),
                "validation": read_shards(storage.join(cache, "validation"), ["path", "label", "block4"])}
    # Caches written before float16 was the default hold float32.
    itemsize = np.dtype(manifest["block4"].get("dtype", "float32")).itemsize
    rows = split_rows(manifest, "train")
    settings = loop_settings(cfg, len(classes), rows, (2 * rows + split_rows(manifest, "validation"))
                             * np.prod(block4_shape) * itemsize, image_size=image_size, augment=True,
                             shift=cfg.shift, cached_block4=True, block4_shape=block4_shape,
                             feature_shape=tuple(vgg16.feature_shape(image_size)),
                             base_weights=ray.put(models.block5_weights(features)),
                             top_weights=ray.put(top.get_weights()))

    def export(best):
        trained = models.block5_classifier(block4_shape, len(classes), "float32")
        load_checkpoint_weights(best, trained)
        model = image_model(block5_source=trained)
        model.get_layer("top").set_weights(trained.get_layer("top").get_weights())
        return model

    validation = read_split(cache, "validation", columns=["path", "label"]).rename_columns(["relpath", "label"])
    return train_export_evaluate(job, cfg, settings, datasets, export, metadata, validation, manifest["data_dir"])


def _finetune_data(cfg: FinetuneConfig, meta: dict[str, Any]) -> tuple[dict[str, Any] | None, DatasetIndex | None,
                                                                        dict[str, Any]]:
    """What fine-tuning trains on: the top model's feature folder with its block-4 cache (its manifest), or the
    image files (their index: ``--data-dir``, else the top model's data); and what the model records of it."""
    if cfg.cache_block4:
        manifest = ensure_block4_cache(meta.get("features_dir"))
        return manifest, None, {"data_dir": manifest["data_dir"], "layout": manifest["layout"],
                                "validation_fraction": manifest["config"]["validation_fraction"],
                                "features_dir": meta.get("features_dir")}
    if cfg.data_dir is not None:
        data_dir, layout, fraction = cfg.data_dir, cfg.layout, cfg.validation_fraction
    else:
        data_dir, layout = meta["data_dir"], meta.get("layout", cfg.layout)
        fraction = meta.get("validation_fraction", cfg.validation_fraction)
    index = discover(data_dir, layout, fraction, cfg.max_images_per_class, cfg.exclude)
    if index.classes != meta["classes"]:
        raise DataError(f"the top model knows classes {meta['classes']} but {data_dir} has {index.classes}")
    return None, index, {"validation_fraction": fraction}


def ensure_block4_cache(features_dir: str | None) -> dict[str, Any]:
    """The manifest of a feature folder (a top model's), with the block-4 cache added when it lacks one."""
    if not features_dir or not storage.exists(storage.join(features_dir, storage.MANIFEST)):
        raise DataError(f"--cache-block4 (the default) needs the feature folder the top model was trained on "
                        f"({features_dir}), which is gone; run jobs.extract_features --cache-block4 and "
                        f"jobs.train_top on it, or fine-tune on the images with --no-cache-block4")
    manifest = storage.read_json(storage.join(features_dir, storage.MANIFEST))
    if manifest.get("block4"):
        return manifest
    # Same settings as the first extraction, so its fingerprint matches and the folder is redone with the cache.
    settings = {k: v for k, v in manifest["config"].items() if k in ExtractConfig.__dataclass_fields__}
    settings.update(output_dir=features_dir, cache_block4=True, overwrite=False, data_dir=manifest["data_dir"])
    return run_extraction(ExtractConfig(**settings))
