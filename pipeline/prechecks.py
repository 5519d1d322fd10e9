"""Output folders refused before a job starts Ray: the ``outputs`` check that each job makes again
under its output lock, run first, so that an --output aimed at the wrong folder fails at once.

Only outputs named on the command line are checked here; a default output folder (under
``outputs/``) is known only once the job has read its inputs, and is checked then.
"""

from __future__ import annotations

from typing import Any

from pipeline import outputs, runall
from pipeline.config import ExtractConfig, FinetuneConfig, PredictConfig, RunAllConfig, ScratchConfig, TrainTopConfig
from pipeline.extract import OUTPUT_LAYOUT
from pipeline.predict import check_targets
from pipeline.trainjobs import JOB_LAYOUT, job_dir, job_folder


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
    elif isinstance(cfg, RunAllConfig):
        outputs.check(cfg.output_dir, runall.LAYOUT)
