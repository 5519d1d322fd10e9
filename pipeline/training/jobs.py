"""What every training job (``top``, ``finetune``, ``scratch``) does on the driver: the reuse rule,
the Ray Train run, the export's evaluation and the outputs under ``<output-dir>/<job>/`` (``JOB_LAYOUT``,
described in docs/jobs.md#training; ``summary.json``, what the run report needs, is written last).
"""

from __future__ import annotations

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
from ray.train import TrainingFailedError

from pipeline.batch.cluster import inference_plan
from pipeline.batch.evaluation import evaluate
from pipeline.batch.inference import check_reject_fraction, decoded_images, find_rejects
from pipeline.batch.predict import collect_probabilities, predictions_dataset
from pipeline.config import FinetuneConfig, ImageTrainConfig, ScratchConfig, TrainConfig
from pipeline.data import outputs, storage
from pipeline.data.discover import DatasetIndex
from pipeline.data.reuse import job_settings, require_same
from pipeline.data.shards import REJECT_SCHEMA
from pipeline.errors import DataError, UserError
from pipeline.nets.modelfile import MODEL_FILE, SAVED_MODEL_DIR, export_saved_model, save_classifier
from pipeline.options import CONFIG_FILE, write_resolved
from pipeline.training import tracking
from pipeline.training.batches import held_bytes
from pipeline.training.checkpoints import load_checkpoint_weights, read_checkpoint_state
from pipeline.training.fit import fit
from pipeline.training.kinds import KINDS, kind_of
from pipeline.training.report import plot_curves, write_metrics_csv
from pipeline.training.settings import LoopSettings, ema_momentum
from pipeline.versions import library_versions

SUMMARY = "summary.json"
SETTINGS = "settings.json"
# What a training job writes in its folder; settings.json comes first.
JOB_LAYOUT = outputs.Layout("a training run", markers=(SETTINGS, SUMMARY), files=(
    CONFIG_FILE, MODEL_FILE, f"{SAVED_MODEL_DIR}/*", "metrics.csv", "evaluation.json", "curves.png", "rejects.parquet",
    tracking.RUN_FILE, "ray_train/*"))
log = logging.getLogger(__name__)


class TrainingError(UserError):
    """A Ray Train run that ended in an error (after its allowed restarts)."""


# The training jobs' folders under <output-dir>, one per job (fine-tuning's two modes apart).
JOB_FOLDERS = tuple(KINDS)


def job_folder(cfg: TrainConfig) -> str:
    """The name of the folder (one of ``JOB_FOLDERS``) that the job of ``cfg`` writes."""
    if isinstance(cfg, FinetuneConfig):
        return "finetune" if cfg.cache_block4 else "finetune_streamed"
    return "scratch" if isinstance(cfg, ScratchConfig) else "top"


def finished_summary(directory: str) -> dict[str, Any] | None:
    """The summary of a job that already finished in ``directory`` (written last), else None."""
    path = storage.join(directory, SUMMARY)
    if storage.exists(storage.join(directory, MODEL_FILE)) and storage.exists(path):
        return storage.read_json(path)
    return None


def split_rows(manifest: dict[str, Any], split: str) -> int:
    """The number of rows of ``split`` in an extraction's manifest."""
    return sum(manifest["counts"].get(split, {}).values())


def learning_rate(cfg: TrainConfig) -> float:
    """``--learning-rate``, else the default of the job's kind (``kinds``)."""
    return cfg.learning_rate or KINDS[job_folder(cfg)].learning_rate


def loop_settings(cfg: TrainConfig, num_classes: int, train_rows: int, data_bytes: float, **kw: Any) -> LoopSettings:
    """The workers' settings for the job of ``cfg``: its training options, whether each worker holds the data
    (``data_bytes``, both splits; ``--hold-data``, by default ``held_bytes``), and ``kw``. DataError when the training split is smaller than one
    batch: every epoch would take no step (a partial last batch is dropped), and the run would 'finish' having
    learnt nothing."""
    if train_rows < cfg.batch_size:
        raise DataError(f"the training split has {train_rows} images, fewer than one batch of {cfg.batch_size}: "
                        f"pass --batch-size {max(1, train_rows)} or less, or add images")
    steps = cfg.epochs * (train_rows // cfg.batch_size)
    kind = KINDS[job_folder(cfg)]
    held = {"auto": held_bytes(kind, data_bytes, cfg.num_workers), "always": int(data_bytes), "never": 0}[cfg.hold_data]
    return LoopSettings(kind=kind.name, epochs=cfg.epochs, batch_size=cfg.batch_size,
                        learning_rate=learning_rate(cfg), seed=cfg.seed, precision=cfg.precision,
                        num_classes=num_classes, dropout=cfg.dropout, hold_in_memory=held > 0, held_bytes=held,
                        ema_momentum=ema_momentum(cfg.ema_momentum, steps), **kw)


@dataclass
class Job:
    """A training job under way on the driver."""

    kind: str
    directory: str
    settings: dict[str, Any]  # as its settings.json records them
    started: float  # time.monotonic() at its start: the summary's wall time counts from it


def prepare(cfg: TrainConfig, name: str, output_dir: str, started: float, drop: tuple[str, ...],
            **inputs: Any) -> tuple[Job, dict[str, Any] | None]:
    """The one reuse rule for the job ``jobs.<name>`` of ``cfg`` in its folder under ``output_dir``, its settings
    ``cfg``'s options (less ``drop``; the learning rate resolved) and ``inputs``: a finished job with the same
    settings is reused (its summary returned), an unfinished one resumed, one with other settings refused, naming
    them; ``--overwrite`` starts afresh. Holds the folder's lock for the rest of the job, refuses files a training
    job does not write and, unless reused, writes its resolved options to ``config.yaml``."""
    folder = job_folder(cfg)
    kind, directory = KINDS[folder].name, storage.join(output_dir, folder)
    settings = job_settings(cfg, drop=drop, learning_rate=learning_rate(cfg), **inputs)
    outputs.hold_lock(directory)
    outputs.prepare(directory, JOB_LAYOUT, cfg.overwrite)
    recorded_at = storage.join(directory, SETTINGS)
    if storage.exists(recorded_at):
        recorded = storage.read_json(recorded_at)
        require_same(directory, f"a {kind} run", recorded, settings)
        done = finished_summary(directory)
        if done:
            log.info(f"reusing finished {kind} model in {directory} (same settings and inputs; --overwrite retrains)")
            return Job(kind, directory, recorded, started), done
        log.info(f"resuming the unfinished {kind} run in {directory} from its last checkpoint")
        settings = recorded
    else:
        if storage.exists(directory) and (finished_summary(directory)
                                          or storage.exists(storage.join(directory, "ray_train"))):
            require_same(directory, f"a {kind} run", None, settings)
        storage.write_json(recorded_at, settings)
    write_resolved(directory, name, cfg, output_dir=output_dir)
    return Job(kind, directory, settings, started), None


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


def run(job: Job, settings: LoopSettings, datasets: dict[str, Any], cfg: TrainConfig) -> TrainedRun:
    """Fit and return the run with its best checkpoint by validation accuracy. Seconds and samples/s add
    up the epochs' own times, so a resumed run reports its whole training, not only the part after it."""
    directory = job.directory
    if storage.is_local(directory) and len([n for n in ray.nodes() if n["Alive"]]) > 1:
        log.warning("training checkpoints go to the local folder %s, but the cluster has several nodes: Ray Train "
                    "needs storage that every node reaches (a shared filesystem, or an s3:// or gs:// --output-dir)",
                    directory)
    handle = tracking.start_run(cfg.mlflow_uri, cfg.mlflow_experiment, directory, storage.basename(directory),
                                job.settings)
    settings = replace(settings, tracking=handle)
    try:
        # Ray Train raises once the restarts are spent; the run then ends FAILED, not left RUNNING.
        result = fit(settings, datasets, cfg.num_workers, cfg.use_gpu,
                     storage.absolute(storage.join(directory, "ray_train")), name="run", max_failures=cfg.max_failures)
    except TrainingFailedError as exc:
        tracking.fail_run(handle)
        raise TrainingError(f"training failed after {cfg.max_failures} restart(s) (a rerun resumes from the last "
                            f"checkpoint): {' '.join(str(exc).split())[:400]}") from exc
    if result.checkpoint is None:
        tracking.fail_run(handle)
        raise TrainingError("training finished without a checkpoint")
    history = read_checkpoint_state(result.checkpoint)["history"]
    best = max(result.best_checkpoints, key=lambda cm: (cm[1]["val_accuracy"], -cm[1]["val_loss"], cm[1]["epoch"]))
    seconds = sum(h.get("seconds", 0.0) for h in history)
    samples = sum(h["train_samples"] for h in history)
    return TrainedRun(best[0], int(best[1]["epoch"]), history, seconds, samples / max(seconds, 1e-9), handle,
                      settings.held_bytes)


def finish(job: Job, model, metadata: dict[str, Any], run: TrainedRun, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Write the job's outputs (model with ``metadata``, metrics, evaluation, curves, summary last); the summary."""
    kind, directory, settings = job.kind, job.directory, job.settings
    history, seconds, samples_per_s = run.history, run.seconds, run.samples_per_s
    metadata = {**metadata, "kind": kind, "settings": settings, "epochs": len(history), "best_epoch": run.best_epoch,
                "trained_precision": history[-1].get("precision"), "validation_accuracy": evaluation["accuracy"],
                "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": library_versions()}
    save_classifier(model, storage.join(directory, MODEL_FILE), metadata)
    export_saved_model(model, storage.join(directory, SAVED_MODEL_DIR), metadata["image_size"])
    write_metrics_csv(history, storage.join(directory, "metrics.csv"))
    storage.write_json(storage.join(directory, "evaluation.json"), evaluation)
    cached = bool(metadata.get("cached_block4"))
    plot_curves(history, storage.join(directory, "curves.png"), kind_of(kind, cached).title)
    summary = {"kind": kind, "cached_block4": cached, "accuracy": evaluation["accuracy"], "loss": evaluation["loss"],
               # "accuracy" is the best epoch's, chosen on these validation photos (it flatters); this is not.
               "last_epoch_accuracy": history[-1]["val_accuracy"],
               "epochs": len(history), "best_epoch": run.best_epoch, "seconds": round(seconds, 2),
               "images_per_s": round(samples_per_s, 2), "worker_peak_rss_bytes": worker_peaks(history),
               "worker_base_rss_bytes": worker_peaks(history, "worker_base_rss_bytes"),
               # What each worker alone took (``memory``): the measure the hold-or-stream rule budgets.
               "worker_peak_private_bytes": worker_peaks(history, "worker_peak_private_bytes"),
               "worker_base_private_bytes": worker_peaks(history, "worker_base_private_bytes"),
               "held_bytes_per_worker": run.held_bytes,
               # Epoch seconds leave out start-up, export and the final evaluation; the wall time has them.
               "wall_s": round(time.monotonic() - job.started, 2),
               "model": storage.join(directory, MODEL_FILE), "curves": storage.join(directory, "curves.png"),
               "settings": settings}
    tracking.finish_run(run.tracking, evaluation, [storage.join(directory, name) for name in
                                                   ("curves.png", "evaluation.json", "metrics.csv", MODEL_FILE)])
    storage.write_json(storage.join(directory, SUMMARY), summary)
    log.info(f"{kind}: validation accuracy {evaluation['accuracy']:.4f}, loss {evaluation['loss']:.4f} "
          f"after {len(history)} epochs, {seconds:.0f}s of epochs ({samples_per_s:.1f} samples/s), "
          f"{summary['wall_s']:.0f}s in all -> {directory}")
    log.info("%s: training workers' peak private memory by rank: %s (before reading data: %s; data held by each: "
             "%.2f GiB); peak resident memory, shared pages included: %s", kind,
             *(_gib(summary[f]) for f in ("worker_peak_private_bytes", "worker_base_private_bytes")),
             run.held_bytes / 2**30, _gib(summary["worker_peak_rss_bytes"]))
    return summary


def _gib(values: list[int]) -> str:
    return ", ".join(f"{b / 2**30:.2f} GiB" for b in values) or "not reported"


def worker_peaks(history: list[dict[str, Any]], field: str = "worker_peak_rss_bytes") -> list[int]:
    """Each training worker's peak memory in bytes by rank (``field``: resident or private, overall or
    before it read data), maxed over ``history``'s epochs since a restarted worker is a new process."""
    reported = [h[field] for h in history if h.get(field)]
    return [max(ranks) for ranks in zip(*reported)]


def _good_rows(index: DatasetIndex, image_size: int, cfg: ImageTrainConfig, directory: str) -> dict[str, pa.Table]:
    """The decodable files per split; undecodable ones go to ``<job>/rejects.parquet``."""
    rejects = find_rejects(index.files, index.root, image_size, cfg.max_pixels).rename_columns(
        {"relpath": "path"}).select(REJECT_SCHEMA.names).cast(REJECT_SCHEMA)
    storage.write_parquet(storage.join(directory, "rejects.parquet"), rejects)
    check_reject_fraction(rejects, len(index.files), cfg.max_reject_fraction, f"See {directory}/rejects.parquet")
    good = index.files.join(rejects.select(["path"]).rename_columns(["relpath"]), "relpath", join_type="left anti")
    return {split: good.filter(pc.equal(good.column("split"), split)).sort_by("relpath") for split in index.split_names}


def _image_datasets(files: dict[str, pa.Table], root: str, image_size: int, cfg: ImageTrainConfig,
                    held: bool) -> dict[str, Any]:
    """Decoded-image datasets, with paths when ``held`` (each worker sorts the rows it holds by them).
    The training files go in a seeded random order: listed class by class, even a local shuffle buffer
    would yield one-class batches, on which a small CNN collapses to a constant."""
    plan = inference_plan(1)
    order = {"train": np.random.default_rng(cfg.seed).permutation(len(files["train"])), "validation": None}
    return {split: decoded_images(files[split], root, image_size, plan.decode_cpus, order=order[split],
                                  max_pixels=cfg.max_pixels)
            .select_columns(["path", "image", "label"] if held else ["image", "label"])
            for split in ("train", "validation")}


def image_job(job: Job, cfg: ImageTrainConfig, index: DatasetIndex, image_size: int, metadata: dict[str, Any],
              model_fn, rotation: float = 0.0, base_weights=None, top_weights=None) -> dict[str, Any]:
    """A job on augmented images of ``index``: train (from ``base_weights`` and ``top_weights`` when given),
    export (``model_fn()`` with the best checkpoint's weights), evaluate, write the outputs (``metadata``
    and the data's)."""
    files = _good_rows(index, image_size, cfg, job.directory)
    # Held images are decoded once, not every epoch, and any worker count trains the same weights.
    settings = loop_settings(cfg, len(index.classes), len(files["train"]),
                             (len(files["train"]) + len(files["validation"])) * image_size ** 2 * 3,
                             image_size=image_size, augment=True, rotation=rotation, shift=cfg.shift,
                             preprocessing=metadata.get("preprocessing", "unit"), base_weights=base_weights,
                             top_weights=top_weights)

    def export(best):
        model = model_fn()
        load_checkpoint_weights(best, model)
        return model

    metadata = {**metadata, "data_dir": storage.absolute(index.root), "layout": index.layout,
                "excluded": index.excluded, "classes": index.classes, "image_size": image_size}
    datasets = _image_datasets(files, index.root, image_size, cfg, settings.hold_in_memory)
    return train_export_evaluate(job, cfg, settings, datasets, export, metadata, files["validation"], index.root)


def train_export_evaluate(job: Job, cfg: ImageTrainConfig, settings: LoopSettings, datasets: dict[str, Any],
                          export, metadata: dict[str, Any], validation: pa.Table, root: str) -> dict[str, Any]:
    """Train, turn the best checkpoint into an image → class model (``export``), evaluate it on ``validation``
    (``relpath``, ``label`` under ``root``) with the batch-prediction pipeline, write the outputs."""
    trained = run(job, settings, datasets, cfg)
    model = export(trained.best)
    # Save first, then evaluate the saved file: what is measured is what prediction will load.
    with tempfile.TemporaryDirectory(prefix="ric-eval-") as tmp:
        tmp_path = os.path.join(tmp, MODEL_FILE)
        save_classifier(model, tmp_path, {**metadata, "kind": job.kind})
        paths, probs, rejects = collect_probabilities(predictions_dataset(
            tmp_path, validation.select(["relpath"]), root, metadata["image_size"], settings.precision,
            inference_plan(1), cfg.batch_size, max_pixels=cfg.max_pixels))
    if rejects:
        raise DataError(f"{len(rejects)} validation files could not be decoded during evaluation: {rejects[:3]}")
    label_of = dict(zip(validation.column("relpath").to_pylist(), validation.column("label").to_pylist()))
    evaluation = evaluate(np.array([label_of[p] for p in paths]), probs, metadata["classes"])
    return finish(job, model, metadata, trained, evaluation)
