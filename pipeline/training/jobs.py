"""The three training jobs (top MLP, fine-tuned VGG16, small CNN): data in, Ray Train run,
model file, metrics, evaluation and curves out, under ``<output-dir>/<job>/``::

    model.keras        image → class model with its metadata (classes, image size, preprocessing…)
    metrics.csv        one row per epoch (no duplicates after a resumed run)
    evaluation.json    final validation loss, accuracy, per-class precision/recall,
                       confusion matrix, ROC AUC (two classes)
    curves.png         loss and accuracy against epochs, train and validation
    summary.json       what the run report needs (accuracy, epochs, time, samples/s)
    ray_train/         Ray Train's storage: checkpoints of the best and the last epoch
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.batch.cluster import inference_plan
from pipeline.batch.evaluation import evaluate
from pipeline.batch.extract import run_extraction
from pipeline.batch.inference import check_reject_fraction, decoded_images, find_rejects
from pipeline.config import ExtractConfig, FinetuneConfig, ImageTrainConfig, ScratchConfig, TrainConfig, TrainTopConfig
from pipeline.data import outputs, storage
from pipeline.data.discover import DatasetIndex, discover
from pipeline.data.reuse import job_settings, require_same
from pipeline.data.shards import data_name, read_split
from pipeline.errors import DataError, UserError
from pipeline.nets import vgg16
from pipeline.nets.modelfile import (
    MODEL_FILE,
    SAVED_MODEL_DIR,
    export_saved_model,
    load_classifier,
    read_metadata,
    save_classifier,
)
from pipeline.training import tracking
from pipeline.training.report import model_title, plot_curves, write_metrics_csv
from pipeline.training.train import (
    LoopSettings,
    default_learning_rate,
    ema_momentum,
    fit,
    load_checkpoint_weights,
    read_checkpoint_state,
)
from pipeline.versions import library_versions

SUMMARY = "summary.json"
SETTINGS = "settings.json"
# What a training job writes in its folder (the module docstring); settings.json comes first.
JOB_LAYOUT = outputs.Layout("a training run", markers=(SETTINGS, SUMMARY), files=(
    MODEL_FILE, f"{SAVED_MODEL_DIR}/*", "metrics.csv", "evaluation.json", "curves.png", "rejects.parquet",
    tracking.RUN_FILE, "ray_train/*"))
log = logging.getLogger(__name__)


class TrainingError(UserError):
    """A Ray Train run that ended in an error (after its allowed restarts)."""


# The training jobs' folders under <output-dir>, one per job (fine-tuning's two modes apart).
JOB_FOLDERS = ("top", "finetune", "finetune_streamed", "scratch")


def job_folder(cfg: TrainConfig) -> str:
    """The name of the folder (one of ``JOB_FOLDERS``) that the job of ``cfg`` writes."""
    if isinstance(cfg, FinetuneConfig):
        return "finetune" if cfg.cache_block4 else "finetune_streamed"
    return "scratch" if isinstance(cfg, ScratchConfig) else "top"


def job_dir(output_dir: str, kind: str) -> str:
    """``<output-dir>/<job>``: the job's folder is named after it (``top``, ``finetune``, ``finetune_streamed``, ``scratch``)."""
    return storage.join(output_dir, kind)


def finished_summary(directory: str) -> dict[str, Any] | None:
    """The summary of a job that already finished in ``directory`` (written last), else None."""
    path = storage.join(directory, SUMMARY)
    if storage.exists(storage.join(directory, MODEL_FILE)) and storage.exists(path):
        return storage.read_json(path)
    return None


# A training worker's memory: a fixed part before it reads any data (TensorFlow, Ray, the model
# and its optimizer), and at its peak at most this many bytes per byte of the data it holds (its
# own copy, Ray's blocks it read from, the batches in flight). First estimates, not measurements:
# from run_all on the 2800-photo sample before a held split was loaded as one copy (two cached
# fine-tuning workers at 5.5 and 6.2 GB RSS for 1.9 GB of block-4 maps each: about 2 GiB + 2x).
# Every job's summary reports base, peak and held bytes per worker; bench/train_memory.py
# measures the three jobs against these figures (not yet run on a quiet machine).
WORKER_BASE_BYTES = 2 * 2**30
HELD_BYTES_FACTOR = 2.0
# The share of the memory Ray may hand out (cluster-wide) that training workers holding their
# data may take together; the rest is for everything else that runs beside them.
HOLD_SHARE = 0.5


def worker_footprint(nbytes: float) -> float:
    """The measured peak memory of a training worker that holds ``nbytes`` of data."""
    return WORKER_BASE_BYTES + HELD_BYTES_FACTOR * nbytes


def fits_in_memory(nbytes: float, workers: int, memory: float | None = None) -> bool:
    """Whether each of ``workers`` workers may hold training data of ``nbytes`` (each holds all
    of it): their measured footprints together within ``HOLD_SHARE`` of ``memory`` (default: the
    memory Ray may hand out across the cluster). Otherwise the data is streamed."""
    if memory is None:
        memory = float(ray.cluster_resources().get("memory", 0))
    return workers * worker_footprint(nbytes) <= HOLD_SHARE * memory


def held_bytes(nbytes: float, workers: int) -> int:
    """``nbytes`` when each worker may hold data of that size, else 0 (streamed)."""
    return int(nbytes) if fits_in_memory(nbytes, workers) else 0


def _rows(manifest: dict[str, Any], split: str) -> int:
    return sum(manifest["counts"].get(split, {}).values())


def require_one_batch(train_rows: int, batch_size: int) -> None:
    """DataError when the training split is smaller than one batch: every epoch would take no
    step (a partial last batch is dropped), and the run would 'finish' having learnt nothing."""
    if train_rows < batch_size:
        raise DataError(f"the training split has {train_rows} images, fewer than one batch of {batch_size}: "
                        f"pass --batch-size {max(1, train_rows)} or less, or add images")


def _settings(kind: str, cfg: TrainConfig, precision: str, num_classes: int, train_rows: int, **kw: Any) -> LoopSettings:
    steps = cfg.epochs * (train_rows // cfg.batch_size)
    return LoopSettings(kind=kind, epochs=cfg.epochs, batch_size=cfg.batch_size,
                        learning_rate=cfg.learning_rate or default_learning_rate(kind), seed=cfg.seed,
                        precision=precision, num_classes=num_classes, dropout=cfg.dropout,
                        ema_momentum=ema_momentum(cfg.ema_momentum, steps), **kw)


@dataclass
class TrainedRun:
    """A finished Ray Train run: its best checkpoint (and that checkpoint's epoch), history and speed."""

    best: Any
    best_epoch: int
    history: list[dict[str, Any]]
    seconds: float
    samples_per_s: float
    tracking: dict[str, str] | None  # the MLflow run's handle, when tracking is on
    held_bytes: int = 0  # the data each worker held (0: streamed)


def _run(settings: LoopSettings, datasets: dict[str, Any], cfg: TrainConfig, directory: str) -> TrainedRun:
    """Fit and return the run with its best checkpoint by validation accuracy.

    Seconds and samples/s add up the epochs' own times, so a resumed run reports its whole
    training, not only the part after the restart.
    """
    if storage.is_local(directory) and len([n for n in ray.nodes() if n["Alive"]]) > 1:
        log.warning("training checkpoints go to the local folder %s, but the cluster has several nodes: Ray Train "
                    "needs storage that every node reaches (a shared filesystem, or an s3:// or gs:// --output-dir)",
                    directory)
    handle = tracking.start_run(cfg.mlflow_uri, cfg.mlflow_experiment, directory, storage.basename(directory),
                                storage.read_json(storage.join(directory, SETTINGS)))
    settings = replace(settings, extras={**settings.extras, "mlflow": handle})
    result = fit(settings, datasets, cfg.num_workers, cfg.use_gpu, storage.absolute(storage.join(directory, "ray_train")),
                 name="run", max_failures=cfg.max_failures)
    if result.error is not None or result.checkpoint is None:
        tracking.fail_run(handle)
    if result.error is not None:
        raise TrainingError(f"training failed after {cfg.max_failures} restart(s): {result.error}")
    if result.checkpoint is None:
        raise TrainingError("training finished without a checkpoint")
    history = read_checkpoint_state(result.checkpoint)["history"]
    best = max(result.best_checkpoints, key=lambda cm: (cm[1]["val_accuracy"], -cm[1]["val_loss"], cm[1]["epoch"]))
    seconds = sum(h.get("seconds", 0.0) for h in history)
    samples = sum(h["train_samples"] for h in history)
    return TrainedRun(best[0], int(best[1]["epoch"]), history, seconds, samples / max(seconds, 1e-9), handle,
                      settings.held_bytes)


def _finish(kind: str, directory: str, model, metadata: dict[str, Any], run: TrainedRun,
            evaluation: dict[str, Any]) -> dict[str, Any]:
    history, seconds, samples_per_s = run.history, run.seconds, run.samples_per_s
    settings = storage.read_json(storage.join(directory, SETTINGS))
    metadata = dict(metadata)
    started = metadata.pop("job_started")
    metadata = {**metadata, "kind": kind, "settings": settings, "epochs": len(history), "best_epoch": run.best_epoch,
                "trained_precision": history[-1].get("precision"), "validation_accuracy": evaluation["accuracy"],
                "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": library_versions()}
    save_classifier(model, storage.join(directory, MODEL_FILE), metadata)
    export_saved_model(model, storage.join(directory, SAVED_MODEL_DIR), metadata["image_size"])
    write_metrics_csv(history, storage.join(directory, "metrics.csv"))
    storage.write_json(storage.join(directory, "evaluation.json"), evaluation)
    cached = bool(metadata.get("cached_block4"))
    plot_curves(history, storage.join(directory, "curves.png"), model_title(kind, cached))
    summary = {"kind": kind, "cached_block4": cached, "accuracy": evaluation["accuracy"], "loss": evaluation["loss"],
               # The best epoch was chosen on the same validation photos, which flatters "accuracy";
               # the last epoch's figure was not chosen by them.
               "last_epoch_accuracy": history[-1]["val_accuracy"],
               "epochs": len(history), "best_epoch": run.best_epoch, "seconds": round(seconds, 2),
               "images_per_s": round(samples_per_s, 2), "worker_peak_rss_bytes": worker_peaks(history),
               "worker_base_rss_bytes": worker_peaks(history, "worker_base_rss_bytes"),
               "held_bytes_per_worker": run.held_bytes,
               # Epoch seconds leave out start-up, export and the final evaluation; the wall time has them.
               "wall_s": round(time.monotonic() - started, 2),
               "model": storage.join(directory, MODEL_FILE), "curves": storage.join(directory, "curves.png"),
               "settings": settings}
    tracking.finish_run(run.tracking, evaluation, [storage.join(directory, name) for name in
                                                   ("curves.png", "evaluation.json", "metrics.csv", MODEL_FILE)])
    storage.write_json(storage.join(directory, SUMMARY), summary)
    log.info(f"{kind}: validation accuracy {evaluation['accuracy']:.4f}, loss {evaluation['loss']:.4f} "
          f"after {len(history)} epochs, {seconds:.0f}s of epochs ({samples_per_s:.1f} samples/s), "
          f"{summary['wall_s']:.0f}s in all -> {directory}")
    log.info("%s: peak resident memory of the training workers by rank: %s (before reading data: %s; data held "
             "by each: %.2f GiB)", kind,
             ", ".join(f"{b / 2**30:.2f} GiB" for b in summary["worker_peak_rss_bytes"]) or "not reported",
             ", ".join(f"{b / 2**30:.2f} GiB" for b in summary["worker_base_rss_bytes"]) or "not reported",
             run.held_bytes / 2**30)
    return summary


def worker_peaks(history: list[dict[str, Any]], field: str = "worker_peak_rss_bytes") -> list[int]:
    """Each training worker's peak resident memory in bytes (``field``: overall, or before it read
    data), by rank, over the epochs of ``history``: a restarted worker starts a new process, so its
    epochs' peaks are maxed."""
    reported = [h[field] for h in history if h.get(field)]
    return [max(ranks) for ranks in zip(*reported)]


def _prepare(directory: str, kind: str, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The one reuse rule: a finished job with the same settings is reused (its summary returned),
    an unfinished one resumes from its checkpoints; one with other settings is refused, naming
    them. ``overwrite`` starts afresh. Holds the folder's output lock for the rest of the job, and
    refuses a folder holding what a training job does not write (``outputs.prepare``)."""
    outputs.hold_lock(directory)
    outputs.prepare(directory, JOB_LAYOUT, overwrite)
    recorded_at = storage.join(directory, SETTINGS)
    if storage.exists(recorded_at):
        require_same(directory, f"a {kind} run", storage.read_json(recorded_at), settings)
        done = finished_summary(directory)
        if done:
            log.info(f"reusing finished {kind} model in {directory} (same settings and inputs; --overwrite retrains)")
            return done
        log.info(f"resuming the unfinished {kind} run in {directory} from its last checkpoint")
        return None
    if storage.exists(directory) and (finished_summary(directory) or storage.exists(storage.join(directory, "ray_train"))):
        require_same(directory, f"a {kind} run", None, settings)
    storage.write_json(recorded_at, settings)
    return None


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


def _feature_datasets(features_dir: str, manifest: dict[str, Any], cfg: TrainTopConfig) -> tuple[dict[str, Any], int]:
    """The top MLP's training and validation datasets and the bytes each worker holds of them (0: streamed)."""
    # The path gives held data an order that does not depend on how Ray read it. Other columns
    # stay unread: an older extraction's train shards may also hold features_flipped.
    columns = ["path", "label", "features"]
    datasets = {split: ray.data.read_parquet(storage.join(features_dir, split)).select_columns(columns)
                for split in ("train", "validation")}
    rows = _rows(manifest, "train") + _rows(manifest, "validation")
    held = held_bytes(rows * np.prod(manifest["feature_shape"]) * 4, cfg.num_workers)
    if not held:
        # Streamed every epoch: a seeded global shuffle gives every batch a mix of classes
        # even from shards written class by class (older extractions); the local buffer
        # reorders them every epoch. Held shards are reshuffled in memory every epoch.
        datasets["train"] = datasets["train"].random_shuffle(seed=cfg.seed)
    return datasets, held


@outputs.holding_locks
def train_top(cfg: TrainTopConfig) -> dict[str, Any]:
    """Fit the top MLP on feature shards; export it joined to its VGG16 base as one image → class model."""
    from pipeline.nets import models
    from pipeline.nets.weights import load_weight_arrays, resolve_weights

    started = time.monotonic()
    features_dir = cfg.features_dir or default_features(cfg.output_dir)
    manifest = finished_features(features_dir)
    output_dir = cfg.output_dir or os.path.join("outputs", data_name(manifest["data_dir"]))
    directory = job_dir(output_dir, "top")
    reused = _prepare(directory, "top", job_settings(cfg, drop=("features_dir",), features=manifest["fingerprint"],
                                                    learning_rate=cfg.learning_rate or default_learning_rate("top")),
                      cfg.overwrite)
    if reused:
        return reused
    # The weights the exported model will carry must be the ones the features came from:
    # checked before training, not after it.
    source = resolve_weights(manifest["weights"]["source"], manifest["preprocessing"])
    if source.sha256 != manifest["weights"]["sha256"]:
        raise DataError(f"the weights {source.name} (sha256 {source.sha256}) differ from those the features were "
                        f"extracted with ({manifest['weights']['sha256']}); re-extract the features")
    require_one_batch(_rows(manifest, "train"), cfg.batch_size)
    num_classes = len(manifest["classes"])
    shape = tuple(manifest["feature_shape"])
    precision = cfg.precision
    datasets, held = _feature_datasets(features_dir, manifest, cfg)
    settings = _settings("top", cfg, precision, num_classes, _rows(manifest, "train"), feature_shape=shape,
                         hold_in_memory=held > 0, held_bytes=held)
    run = _run(settings, datasets, cfg, directory)

    top = models.top_classifier(shape, num_classes, "float32", dropout=cfg.dropout)
    load_checkpoint_weights(run.best, top)
    val = read_split(features_dir, "validation")
    from pipeline.data.shards import features_as_array

    probs = models.probabilities(top.predict(features_as_array(val, shape), batch_size=256, verbose=0), num_classes)
    evaluation = evaluate(val.column("label").to_numpy(), probs, manifest["classes"])

    features = models.feature_extractor(manifest["image_size"], load_weight_arrays(source, manifest["image_size"]),
                                        manifest["preprocessing"], "float32")
    model = models.image_classifier(features, top, name="vgg16_bottleneck_classifier")
    metadata = {"job_started": started, "classes": manifest["classes"], "image_size": manifest["image_size"],
                "weights": manifest["weights"], "preprocessing": manifest["preprocessing"],
                "data_dir": manifest["data_dir"], "layout": manifest["layout"],
                "validation_fraction": manifest["config"]["validation_fraction"],
                "features_dir": storage.absolute(features_dir),
                "synthetic": manifest.get("synthetic", False)}
    return _finish("top", directory, model, metadata, run, evaluation)


def _good_rows(index: DatasetIndex, image_size: int, cfg: ImageTrainConfig, directory: str) -> dict[str, pa.Table]:
    """The decodable files per split; undecodable ones go to ``<job>/rejects.parquet``."""
    from pipeline.data.shards import REJECT_SCHEMA

    rejects = find_rejects(index.files, index.root, image_size, cfg.max_pixels).rename_columns(
        {"relpath": "path"}).select(REJECT_SCHEMA.names).cast(REJECT_SCHEMA)
    storage.write_parquet(storage.join(directory, "rejects.parquet"), rejects)
    check_reject_fraction(rejects, len(index.files), cfg.max_reject_fraction, f"See {directory}/rejects.parquet")
    good = index.files.join(rejects.select(["path"]).rename_columns(["relpath"]), "relpath", join_type="left anti")
    return {split: good.filter(pc.equal(good.column("split"), split)).sort_by("relpath") for split in index.split_names}


def _image_datasets(files: dict[str, pa.Table], root: str, image_size: int, cfg: ImageTrainConfig) -> dict[str, Any]:
    """Decoded-image datasets; the training files in a seeded random order.

    Files are listed class by class; streamed in that order, even a local shuffle buffer
    yields batches of one class, and a small CNN trained on them collapses to a constant.
    """
    plan = inference_plan(1)
    order = {"train": np.random.default_rng(cfg.seed).permutation(len(files["train"])), "validation": None}
    return {split: decoded_images(files[split], root, image_size, plan.decode_cpus, order=order[split],
                                  max_pixels=cfg.max_pixels)
            .select_columns(["image", "label"]) for split in ("train", "validation")}


def _evaluate_model_file(path: str, files: pa.Table, root: str, classes: list[str], image_size: int,
                         precision: str, batch_size: int, max_pixels: int) -> dict[str, Any]:
    """Evaluate a saved classifier on ``files`` (``relpath``, ``label`` under ``root``) with the
    batch-prediction pipeline."""
    from pipeline.batch.predict import collect_probabilities, predictions_dataset

    ds = predictions_dataset(path, files.select(["relpath"]), root, image_size, precision, inference_plan(1),
                             batch_size, max_pixels=max_pixels)
    paths, probs, rejects = collect_probabilities(ds)
    if rejects:
        raise DataError(f"{len(rejects)} validation files could not be decoded during evaluation: {rejects[:3]}")
    label_of = dict(zip(files.column("relpath").to_pylist(), files.column("label").to_pylist()))
    return evaluate(np.array([label_of[p] for p in paths]), probs, classes)


def _image_job(kind: str, cfg: FinetuneConfig | ScratchConfig, index: DatasetIndex, directory: str,
               image_size: int, precision: str, metadata: dict[str, Any], extras: dict[str, Any], model_fn,
               rotation: float = 0.0) -> dict[str, Any]:
    files = _good_rows(index, image_size, cfg, directory)
    require_one_batch(len(files["train"]), cfg.batch_size)
    datasets = _image_datasets(files, index.root, image_size, cfg)
    settings = _settings(kind, cfg, precision, len(index.classes), len(files["train"]), image_size=image_size,
                         augment=True, rotation=rotation, shift=cfg.shift,
                         preprocessing=metadata.get("preprocessing", "unit"), extras=extras)

    def export(best):
        model = model_fn()
        load_checkpoint_weights(best, model)
        return model

    return _train_export_evaluate(kind, cfg, settings, datasets, directory, export,
                                  {**metadata, "classes": index.classes, "image_size": image_size},
                                  files["validation"], index.root)


def _train_export_evaluate(kind: str, cfg: ImageTrainConfig, settings: LoopSettings, datasets: dict[str, Any],
                           directory: str, export, metadata: dict[str, Any], validation: pa.Table,
                           root: str) -> dict[str, Any]:
    """Train, turn the best checkpoint into an image → class model (``export``), evaluate it, write the outputs."""
    run = _run(settings, datasets, cfg, directory)
    model = export(run.best)
    # Save first, then evaluate the saved file: what is measured is what prediction will load.
    with tempfile.TemporaryDirectory(prefix="ric-eval-") as tmp:
        tmp_path = os.path.join(tmp, MODEL_FILE)
        save_classifier(model, tmp_path, {**metadata, "kind": kind})
        evaluation = _evaluate_model_file(tmp_path, validation, root, metadata["classes"], metadata["image_size"],
                                          settings.precision, cfg.batch_size, cfg.max_pixels)
    return _finish(kind, directory, model, metadata, run, evaluation)


def _top_model(cfg: FinetuneConfig) -> tuple[str, dict[str, Any]]:
    """The ``train_top`` model fine-tuning starts from: its location and metadata."""
    output_dir = cfg.output_dir
    top_path = cfg.top_model or (storage.join(job_dir(output_dir, "top"), MODEL_FILE) if output_dir else None)
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
    directory = job_dir(output_dir, job_folder(cfg))
    manifest, index = _finetune_data(cfg, meta)
    recorded = job_settings(cfg, drop=("top_model", "data_dir"),
                            data=manifest["fingerprint"] if manifest else index.fingerprint(),
                            top_model_sha256=hashlib.sha256(storage.read_bytes(top_path)).hexdigest(),
                            learning_rate=cfg.learning_rate or default_learning_rate("finetune"))
    reused = _prepare(directory, "finetune", recorded, cfg.overwrite)
    if reused:
        return reused
    top_model, _ = load_classifier(top_path)
    metadata = {"job_started": started, "weights": meta["weights"], "preprocessing": meta["preprocessing"],
                "top_model": storage.absolute(top_path), "synthetic": meta.get("synthetic", False),
                "classes": meta["classes"], "image_size": meta["image_size"], "cached_block4": cfg.cache_block4}
    if cfg.cache_block4:
        return _finetune_cached(cfg, meta, manifest, top_model, directory, metadata)
    features, top = top_model.get_layer("vgg16_features"), top_model.get_layer("top")
    extras = {"base_weights": ray.put(features.get_weights()), "top_weights": ray.put(top.get_weights())}
    metadata.update(data_dir=storage.absolute(index.root), layout=index.layout,
                    validation_fraction=_data_options(cfg, meta)[2])
    return _image_job("finetune", cfg, index, directory, meta["image_size"], cfg.precision, metadata, extras,
                      _finetuned_image_model(meta, features.get_weights()))


def _finetuned_image_model(meta: dict[str, Any], base_weights: list[np.ndarray]):
    """A builder of the image → class model fine-tuning exports: VGG16 frozen below block 5 and a
    top; with ``block5_source``, the base weights with block 5 taken from that model."""
    from pipeline.nets import models
    from pipeline.training.train import freeze_below_block5

    image_size, classes = meta["image_size"], meta["classes"]
    shape = tuple(vgg16.feature_shape(image_size))

    def build(block5_source=None):
        f = models.feature_extractor(image_size, base_weights if block5_source else None, meta["preprocessing"],
                                     "float32")
        if block5_source is not None:
            models.copy_block5(block5_source, f)
        freeze_below_block5(f)
        return models.image_classifier(f, models.top_classifier(shape, len(classes), "float32"), name="vgg16_finetuned")

    return build


def _finetune_cached(cfg: FinetuneConfig, meta: dict[str, Any], manifest: dict[str, Any], top_model,
                     directory: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """Fine-tuning on the block-4 cache of the top model's feature folder (``--cache-block4``)."""
    from pipeline.nets import models

    features, top = top_model.get_layer("vgg16_features"), top_model.get_layer("top")
    classes, shape = meta["classes"], tuple(vgg16.feature_shape(meta["image_size"]))
    features_dir = meta.get("features_dir")
    require_one_batch(_rows(manifest, "train"), cfg.batch_size)
    block4_shape = tuple(manifest["block4"]["shape"])
    cache = storage.join(features_dir, manifest["block4"]["dir"])
    # Shards already mix the classes (extraction writes rows in a seeded random order): a
    # cache that streams needs only a per-epoch block order plus the local shuffle buffer;
    # one that is held is reshuffled in memory every epoch.
    datasets = {"train": ray.data.read_parquet(storage.join(cache, "train"))
                .select_columns(["path", "label", "block4", "block4_flipped"]).randomize_block_order(seed=cfg.seed),
                "validation": ray.data.read_parquet(storage.join(cache, "validation"))
                .select_columns(["path", "label", "block4"])}
    held = held_bytes((2 * _rows(manifest, "train") + _rows(manifest, "validation")) * np.prod(block4_shape) * 4,
                      cfg.num_workers)
    settings = _settings("finetune", cfg, cfg.precision, len(classes), _rows(manifest, "train"),
                         image_size=meta["image_size"], augment=True, shift=cfg.shift,
                         cached_block4=True, block4_shape=block4_shape, feature_shape=shape, hold_in_memory=held > 0,
                         held_bytes=held,
                         extras={"base_weights": ray.put(models.block5_weights(features)),
                                 "top_weights": ray.put(top.get_weights())})
    image_model = _finetuned_image_model(meta, features.get_weights())

    def export(best):
        trained = models.block5_classifier(block4_shape, len(classes), "float32")
        load_checkpoint_weights(best, trained)
        model = image_model(block5_source=trained)
        model.get_layer("top").set_weights(trained.get_layer("top").get_weights())
        return model

    validation = read_split(cache, "validation", columns=["path", "label"]).rename_columns(["relpath", "label"])
    metadata.update(data_dir=manifest["data_dir"], layout=manifest["layout"],
                    validation_fraction=manifest["config"]["validation_fraction"], features_dir=features_dir)
    return _train_export_evaluate("finetune", cfg, settings, datasets, directory, export, metadata, validation,
                                  manifest["data_dir"])


def _finetune_data(cfg: FinetuneConfig, meta: dict[str, Any]) -> tuple[dict[str, Any] | None, DatasetIndex | None]:
    """What fine-tuning trains on: the top model's feature folder with its block-4 cache (its
    manifest), or the image files (their index: ``--data-dir``, else the top model's data)."""
    if cfg.cache_block4:
        return ensure_block4_cache(meta.get("features_dir")), None
    data_dir, layout, fraction = _data_options(cfg, meta)
    index = discover(data_dir, layout, fraction, cfg.max_images_per_class)
    if index.classes != meta["classes"]:
        raise DataError(f"the top model knows classes {meta['classes']} but {data_dir} has {index.classes}")
    return None, index


def _data_options(cfg: FinetuneConfig, meta: dict[str, Any]) -> tuple[str, str, float]:
    """(data root, layout, validation fraction): ``--data-dir``'s, else those the top model was trained on."""
    if cfg.data_dir is not None:
        return cfg.data_dir, cfg.layout, cfg.validation_fraction
    return meta["data_dir"], meta.get("layout", cfg.layout), meta.get("validation_fraction", cfg.validation_fraction)


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


@outputs.holding_locks
def train_scratch(cfg: ScratchConfig) -> dict[str, Any]:
    """Train the reference article's small CNN from scratch on augmented images."""
    from pipeline.data.synthetic import default_data_dir, is_synthetic, note_builtin_data
    from pipeline.nets import models

    started = time.monotonic()
    data_dir = cfg.data_dir or default_data_dir()
    synthetic = is_synthetic(data_dir)
    if synthetic:
        note_builtin_data()
    output_dir = cfg.output_dir or os.path.join("outputs", data_name(data_dir))
    directory = job_dir(output_dir, "scratch")
    index = discover(data_dir, cfg.layout, cfg.validation_fraction, cfg.max_images_per_class)
    settings = job_settings(cfg, drop=("data_dir",), data=index.fingerprint(),
                            learning_rate=cfg.learning_rate or default_learning_rate("scratch"))
    reused = _prepare(directory, "scratch", settings, cfg.overwrite)
    if reused:
        return reused
    precision = cfg.precision
    metadata = {"job_started": started, "weights": None, "preprocessing": "unit",
                "data_dir": storage.absolute(data_dir), "layout": cfg.layout,
                "validation_fraction": cfg.validation_fraction, "synthetic": synthetic}
    return _image_job("scratch", cfg, index, directory, cfg.image_size, precision, metadata, {},
                      lambda: models.scratch_cnn(cfg.image_size, len(index.classes), "float32", dropout=cfg.dropout),
                      rotation=cfg.rotation)
