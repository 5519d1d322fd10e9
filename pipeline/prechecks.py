"""A job's preflight: what its options name is checked before Ray starts, so that a wrong option fails at once,
not after the cluster is up. Configs check shapes and ranges only; the checks that read the world are here: the
locations the fields declare (``field_help(location=)``), output folders' contents, MLflow, the serving exposure.

Only outputs named on the command line are checked here: a default output folder is known only once the job has
read its inputs (each job checks its output again under its output lock).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from pipeline import runall
from pipeline.audit import doctor
from pipeline.audit.leakage import check_top_model
from pipeline.batch.extract import OUTPUT_LAYOUT
from pipeline.batch.predict import check_targets
from pipeline.config import NAMED_WEIGHTS, AuditConfig, ExtractConfig, PredictConfig, ServeConfig, TrainConfig
from pipeline.data import outputs, storage
from pipeline.errors import ConfigError
from pipeline.nets.modelfile import read_metadata
from pipeline.options import flag
from pipeline.serving.auth import check_exposure, read_token
from pipeline.training.jobs import JOB_LAYOUT, job_folder
from pipeline.training.tracking import check_available


def check_input(name: str, value: str, want: str = "folder") -> None:
    """Refuse an input location (local path or URI) that is missing, of the wrong kind or unreadable."""
    problem = storage.describe_problem(value, want)
    if problem:
        raise ConfigError(f"{flag(name)} {value!r} cannot be used: {problem}")


def check_output(name: str, value: str) -> None:
    """Refuse an output location that is an existing regular file, or on a bucket that does not exist."""
    problem = storage.describe_output_problem(value)
    if problem:
        raise ConfigError(f"{flag(name)} {value!r} cannot be written: {problem}")
    if storage.is_file(value):
        raise ConfigError(f"{flag(name)} must be a folder, but {value!r} is an existing file")


def check_weights(name: str, value: str) -> None:
    """``--weights`` is one of the named sources or an existing file."""
    if value not in NAMED_WEIGHTS and not os.path.isfile(value):
        raise ConfigError(f"{flag(name)} must be one of {', '.join(NAMED_WEIGHTS)} or a path to a Keras weights "
                          f"file; got {value!r}")


# What a field's ``location`` names, and its check.
LOCATIONS: dict[str, Callable[[str, str], Any]] = {
    "folder": check_input,
    "file": lambda name, value: check_input(name, value, "file"),
    "output": check_output,
    "model": lambda name, value: read_metadata(value),  # a missing or foreign model file
    "weights": check_weights,
}


def preflight(cfg: Any) -> None:
    """Raise a UserError naming the option when what ``cfg`` names cannot be used by its job."""
    if hasattr(cfg, "mlflow_uri"):
        check_available(cfg.mlflow_uri)
    if isinstance(cfg, ServeConfig):
        # Exposure first: a server that must not start says so whatever else is wrong.
        check_exposure(cfg.host, read_token(cfg.auth_token_file), cfg.insecure)
    for f in dataclasses.fields(cfg):  # every location the fields name (None: the job's default)
        if f.metadata.get("location") and getattr(cfg, f.name) is not None:
            LOCATIONS[f.metadata["location"]](f.name, getattr(cfg, f.name))
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
    elif isinstance(cfg, TrainConfig):
        outputs.check(storage.join(cfg.output_dir, job_folder(cfg)), JOB_LAYOUT)
    elif isinstance(cfg, runall.RunAllConfig):
        outputs.check(cfg.output_dir, runall.LAYOUT)
    elif isinstance(cfg, AuditConfig):
        outputs.check(cfg.output_dir, doctor.LAYOUT)
