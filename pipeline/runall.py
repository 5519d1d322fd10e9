"""The main job: extraction → top MLP → fine-tuning → small CNN, then ``report.md``."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from typing import Any

from pipeline.audit import doctor
from pipeline.batch.extract import OUTPUT_LAYOUT, run_extraction
from pipeline.config import AuditConfig, ExtractConfig, FinetuneConfig, RunAllConfig, ScratchConfig, TrainTopConfig
from pipeline.data import outputs, storage
from pipeline.data.shards import data_name
from pipeline.data.synthetic import NOTE, default_data_dir, note_builtin_data
from pipeline.nets.modelfile import MODEL_FILE
from pipeline.redact import redact
from pipeline.training.finetune import finetune
from pipeline.training.jobs import JOB_FOLDERS, JOB_LAYOUT
from pipeline.training.report import write_report
from pipeline.training.scratch import train_scratch
from pipeline.training.top import train_top

log = logging.getLogger(__name__)

SYNTHETIC_EPOCHS = 5
REPORT = "report.md"
STAGE_FOLDERS = {"features": OUTPUT_LAYOUT, "audit": doctor.LAYOUT, **{kind: JOB_LAYOUT for kind in JOB_FOLDERS}}
# The output folder: report.md, each stage's folder (judged by that stage's layout) and the locks
# the stages hold beside their folders; a report or a recognised stage folder marks it as ours.
LAYOUT = outputs.Layout("a run_all output", markers=(REPORT,), files=tuple(f"{f}.lock" for f in STAGE_FOLDERS),
                        folders=STAGE_FOLDERS)


def _stage_epochs(cfg: RunAllConfig, stage: str, synthetic: bool) -> dict[str, int]:
    # The built-in set only proves the installation: a few epochs show every stage working
    # in minutes; real data gets each job's own default unless an option says otherwise.
    chosen = [getattr(cfg, f"{stage}_epochs"), cfg.epochs, SYNTHETIC_EPOCHS if synthetic else None]
    epochs = next((e for e in chosen if e is not None), None)
    return {"epochs": epochs} if epochs is not None else {}


def stage_options(cfg: RunAllConfig, data_dir: str, output_dir: str, synthetic: bool) -> dict[str, dict[str, Any]]:
    """The options each stage's config is built from (less the inputs that exist only once the
    stage before has run: the top MLP's feature folder, fine-tuning's top model)."""
    images = dict(data_dir=data_dir, layout=cfg.layout, validation_fraction=cfg.validation_fraction,
                  max_images_per_class=cfg.max_images_per_class, max_reject_fraction=cfg.max_reject_fraction,
                  max_image_megapixels=cfg.max_image_megapixels, exclude=cfg.exclude)
    training = dict(output_dir=output_dir, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, batch_size=cfg.batch_size,
                    dropout=cfg.dropout, ema_momentum=cfg.ema_momentum, seed=cfg.seed, precision=cfg.precision,
                    max_failures=cfg.max_failures,
                    overwrite=cfg.overwrite, mlflow_uri=cfg.mlflow_uri, mlflow_experiment=cfg.mlflow_experiment)

    def trainer(stage: str) -> dict[str, Any]:
        return {**training, **_stage_epochs(cfg, stage, synthetic), "learning_rate": getattr(cfg, f"{stage}_learning_rate")}

    return {
        "extract_features": dict(output_dir=storage.join(output_dir, "features"), image_size=cfg.image_size,
                                 weights=cfg.weights, preprocessing=cfg.preprocessing, precision=cfg.precision,
                                 workers=cfg.workers, gpus=cfg.gpus, gpu_wait_s=cfg.gpu_wait_s,
                                 batch_size=cfg.batch_size, block_files=cfg.block_files,
                                 cache_block4=cfg.cache_block4, overwrite=cfg.overwrite, **images),
        # The doctor reads the extraction's features (with its own defaults); it excludes nothing.
        "audit_data": dict(output_dir=storage.join(output_dir, "audit"), overwrite=cfg.overwrite,
                           max_image_megapixels=cfg.max_image_megapixels),
        "train_top": trainer("top"),
        # Cached fine-tuning reads the images' block-4 outputs from the extraction, not the images.
        "finetune": {**trainer("finetune"), "shift": cfg.finetune_shift, "cache_block4": cfg.cache_block4,
                     "max_image_megapixels": cfg.max_image_megapixels, **({} if cfg.cache_block4 else images)},
        "train_scratch": {**trainer("scratch"), "batch_size": cfg.scratch_batch_size,
                          "image_size": cfg.scratch_image_size, "shift": cfg.scratch_shift,
                          "rotation": cfg.rotation, **images},
    }


def report_command(argv: list[str]) -> str:
    """The command line the report shows, credentials in URIs redacted (``--mlflow-uri``...)."""
    return redact(" ".join(["python -m jobs.run_all", *map(shlex.quote, argv)]))


def run_all(cfg: RunAllConfig) -> str:
    """Run every stage into ``<output-dir>`` and return the path of ``report.md``.

    Holds ``<output-dir>``'s lock throughout (the stages lock their own folders inside it), and
    refuses a folder holding what no stage writes (``LAYOUT``); with ``--overwrite`` each stage
    replaces only its own folder.
    """
    synthetic = cfg.data_dir is None
    data_dir = default_data_dir() if synthetic else cfg.data_dir
    if synthetic:
        note_builtin_data()
    output_dir = cfg.output_dir or os.path.join("outputs", data_name(data_dir))
    with storage.output_lock(output_dir):
        outputs.check(output_dir, LAYOUT)
        return _run_stages(cfg, data_dir, output_dir, synthetic)


def _run_stages(cfg: RunAllConfig, data_dir: str, output_dir: str, synthetic: bool) -> str:
    """Extraction, the audit when asked, the training stages not skipped, then the report; returns the report's path."""
    options = stage_options(cfg, data_dir, output_dir, synthetic)
    stages: list[dict[str, Any]] = []

    manifest = run_extraction(ExtractConfig(**options["extract_features"]))
    stages.append({"stage": "extract_features", "seconds": manifest["elapsed_s"],
                   "images_per_s": manifest["images_per_s"]})
    if cfg.audit:
        audit = doctor.audit_data(AuditConfig(features_dir=manifest["output_dir"], **options["audit_data"]))
        stages.append({"stage": f"audit_data: [report]({storage.relative(audit['report'], output_dir)})",
                       "seconds": audit["elapsed_s"]})

    def stage(name: str, fn, job_cfg) -> None:
        summary = fn(job_cfg)
        stages.append({"stage": name, **summary, "curves": storage.relative(summary["curves"], output_dir)})

    stage("train_top", train_top, TrainTopConfig(features_dir=manifest["output_dir"], **options["train_top"]))
    if "finetune" not in cfg.skipped():
        stage("finetune", finetune, FinetuneConfig(top_model=storage.join(output_dir, "top", MODEL_FILE),
                                                   **options["finetune"]))
    if "scratch" not in cfg.skipped():
        stage("train_scratch", train_scratch, ScratchConfig(**options["train_scratch"]))
    report = storage.join(output_dir, REPORT)
    write_report(report, stages, NOTE if synthetic else None, report_command(sys.argv[1:]))
    log.info(f"report: {report}")
    return report
