"""The main job: extraction → top MLP → fine-tuning → small CNN, then ``report.md``."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from pipeline import storage
from pipeline.config import ExtractConfig, FinetuneConfig, RunAllConfig, ScratchConfig, TrainTopConfig
from pipeline.extract import run_extraction, run_name
from pipeline.modelfile import MODEL_FILE
from pipeline.report import write_report
from pipeline.synthetic import NOTE, default_data_dir
from pipeline.trainjobs import finetune, train_scratch, train_top

SYNTHETIC_EPOCHS = 5


def run_all(cfg: RunAllConfig) -> str:
    """Run every stage into ``<output-dir>`` and return the path of ``report.md``."""
    synthetic = cfg.data_dir is None
    data_dir = default_data_dir() if synthetic else cfg.data_dir
    if synthetic:
        print(f"note: {NOTE}")
    output_dir = cfg.output_dir or os.path.join("outputs", run_name(data_dir))
    # The built-in set only proves the installation: a few epochs show every stage working
    # in minutes; real data gets each job's own default unless --epochs says otherwise.
    epochs = {"epochs": cfg.epochs} if cfg.epochs is not None else ({"epochs": SYNTHETIC_EPOCHS} if synthetic else {})
    common = dict(output_dir=output_dir, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, batch_size=cfg.batch_size,
                  seed=cfg.seed, precision=cfg.precision, overwrite=cfg.overwrite, **epochs)
    images = dict(data_dir=data_dir, layout=cfg.layout, validation_fraction=cfg.validation_fraction,
                  max_images_per_class=cfg.max_images_per_class, max_reject_fraction=cfg.max_reject_fraction)
    stages: list[dict[str, Any]] = []

    manifest = run_extraction(ExtractConfig(
        output_dir=storage.join(output_dir, "features"), weights=cfg.weights, precision=cfg.precision,
        batch_size=cfg.batch_size, cache_block4=cfg.cache_block4, gpus=cfg.gpus, gpu_wait_s=cfg.gpu_wait_s,
        overwrite=cfg.overwrite, **images))
    stages.append({"stage": "extract_features", "seconds": manifest["elapsed_s"],
                   "images_per_s": manifest["images_per_s"]})

    def stage(name: str, fn, job_cfg) -> None:
        summary = fn(job_cfg)
        stages.append({"stage": name, **summary, "curves": storage.relative(summary["curves"], output_dir)})

    stage("train_top", train_top, TrainTopConfig(features_dir=manifest["output_dir"], **common))
    if "finetune" not in cfg.skipped():
        # Cached fine-tuning reads the images' block-4 outputs from the extraction, not the images.
        data = {"cache_block4": True} if cfg.cache_block4 else images
        stage("finetune", finetune, FinetuneConfig(top_model=storage.join(output_dir, "top", MODEL_FILE),
                                                   **data, **common))
    if "scratch" not in cfg.skipped():
        stage("train_scratch", train_scratch, ScratchConfig(image_size=manifest["image_size"], **images, **common))
    report = storage.join(output_dir, "report.md")
    command = "python -m jobs.run_all " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_report(report, stages, NOTE if synthetic else None, command.strip())
    print(f"report: {report}")
    return report
