"""The ``train_scratch`` job: the reference article's small CNN, from scratch, on augmented images."""

from __future__ import annotations

import time
from typing import Any

from pipeline.config import ScratchConfig
from pipeline.data import outputs
from pipeline.data.discover import resolve_data
from pipeline.training.jobs import image_job, prepare


@outputs.holding_locks
def train_scratch(cfg: ScratchConfig) -> dict[str, Any]:
    """Train the reference article's small CNN from scratch on augmented images."""
    from pipeline.nets import models  # Keras (seconds to load): not before the job runs

    started = time.monotonic()
    _, synthetic, output_dir, index = resolve_data(cfg)
    job, reused = prepare(cfg, "train_scratch", output_dir, started, ("data_dir",), data=index.fingerprint())
    if reused:
        return reused
    metadata = {"weights": None, "preprocessing": "unit", "validation_fraction": cfg.validation_fraction,
                "synthetic": synthetic}
    return image_job(job, cfg, index, cfg.image_size, metadata,
                     lambda: models.scratch_cnn(cfg.image_size, len(index.classes), "float32", dropout=cfg.dropout),
                     rotation=cfg.rotation)
