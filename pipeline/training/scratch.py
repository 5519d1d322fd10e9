"""The ``train_scratch`` job: the reference article's small CNN, from scratch, on augmented images."""

from __future__ import annotations

import time
from typing import Any

from pipeline.config import ScratchConfig
from pipeline.data import outputs, storage
from pipeline.data.discover import resolve_data
from pipeline.data.reuse import job_settings
from pipeline.options import write_resolved
from pipeline.training.jobs import image_job, prepare
from pipeline.training.kinds import KINDS


@outputs.holding_locks
def train_scratch(cfg: ScratchConfig) -> dict[str, Any]:
    """Train the reference article's small CNN from scratch on augmented images."""
    from pipeline.nets import models  # Keras (seconds to load): not before the job runs

    started = time.monotonic()
    data_dir, synthetic, output_dir, index = resolve_data(cfg)
    settings = job_settings(cfg, drop=("data_dir",), data=index.fingerprint(),
                            learning_rate=cfg.learning_rate or KINDS["scratch"].learning_rate)
    job, reused = prepare("scratch", storage.join(output_dir, "scratch"), settings, cfg.overwrite, started)
    if reused:
        return reused
    write_resolved(job.directory, "train_scratch", cfg, output_dir=output_dir)
    metadata = {"weights": None, "preprocessing": "unit",
                "data_dir": storage.absolute(data_dir), "layout": cfg.layout,
                "validation_fraction": cfg.validation_fraction, "synthetic": synthetic, "excluded": index.excluded}
    return image_job(job, cfg, index, cfg.image_size, metadata,
                     lambda: models.scratch_cnn(cfg.image_size, len(index.classes), "float32", dropout=cfg.dropout),
                     rotation=cfg.rotation)
