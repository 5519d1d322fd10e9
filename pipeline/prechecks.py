"""A job's preflight: what its options name is checked before Ray starts, so that a wrong
option fails at once, not after the cluster is up. Configs check shapes and ranges only; the
checks that read the world (output folders, the model file, MLflow, the serving exposure) are
here.

Only outputs named on the command line are checked here; a default output folder (under
``outputs/``) is known only once the job has read its inputs, and is checked then (each job
makes the ``outputs`` check again under its output lock).
"""

from __future__ import annotations

from typing import Any

from pipeline import runall
from pipeline.audit import doctor
from pipeline.audit.leakage import check_top_model
from pipeline.batch.extract import OUTPUT_LAYOUT
from pipeline.batch.predict import check_targets
from pipeline.config import (
    AuditConfig,
    ExtractConfig,
    FinetuneConfig,
    PredictConfig,
    ScratchConfig,
    ServeConfig,
    TrainTopConfig,
)
from pipeline.data import outputs
from pipeline.nets.modelfile import read_metadata
from pipeline.serving.auth import check_exposure, read_token
from pipeline.training.jobs import JOB_LAYOUT, job_dir, job_folder
from pipeline.training.tracking import check_available


def preflight(cfg: Any) -> None:
    """Raise a UserError naming the option when what ``cfg`` names cannot be used by its job."""
    if hasattr(cfg, "mlflow_uri"):
        check_available(cfg.mlflow_uri)
    if isinstance(cfg, ServeConfig):
        # Exposure first: a server that must not start says so whatever else is wrong.
        check_exposure(cfg.host, read_token(cfg.auth_token_file), cfg.insecure)
        read_metadata(cfg.model)  # a missing or foreign model file
    if isinstance(cfg, AuditConfig) and cfg.top_model:
        check_top_model(cfg.top_model)
    check_outputs(cfg)


def check_outputs(cfg: Any) -> None:
    """Refuse (OutputError) the output a job's config names when that job may not write into it."""
    if isinstance(cfg, PredictConfig):
        check_targets(cfg.output, cfg.overwrite)
    elif getattr(cfg, "output_dir", None) is None:
        return
    elif isinstance(cfg, ExtractConfig):
        outputs.check(cfg.output_dir, OUTPUT_LAYOUT)
    elif isinstance(cfg, (TrainTopConfig, FinetuneConfig, ScratchConfig)):
        outputs.check(job_dir(cfg.output_dir, job_folder(cfg)), JOB_LAYOUT)
    elif isinstance(cfg, runall.RunAllConfig):
        outputs.check(cfg.output_dir, runall.LAYOUT)
    elif isinstance(cfg, AuditConfig):
        outputs.check(cfg.output_dir, doctor.LAYOUT)
