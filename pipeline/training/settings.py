"""What every Ray Train worker is told: one typed record per run, passed as ``train_loop_config``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The average spans at most this fraction of a run's steps (see ema_momentum).
EMA_MAX_SPAN = 0.1


@dataclass
class LoopSettings:
    """Everything a training worker needs, passed to it as ``train_loop_config``."""

    kind: str
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    precision: str
    num_classes: int
    # Each kind sets what it uses (images: image_size; top: feature_shape; cached: block4_shape),
    # so a default can never stand in for the data's real shape.
    image_size: int | None = None
    feature_shape: tuple[int, ...] | None = None
    # Fine-tuning on cached block-4 outputs (columns block4 / block4_flipped) instead of images.
    cached_block4: bool = False
    block4_shape: tuple[int, ...] | None = None
    # Data small enough to hold: each worker reads all of it once and draws every epoch from memory
    # in a fresh seeded order, instead of re-running the Ray Data pipeline (decoding, shuffling).
    hold_in_memory: bool = False
    # The bytes of the data each worker holds (0: streamed), reported in the job's summary.
    held_bytes: int = 0
    dropout: float = 0.5
    # Momentum of the weights' moving average that evaluation, checkpoints and the export use (0: off).
    ema_momentum: float = 0.0
    augment: bool = False
    # Image augmentation beyond the article's shear, zoom and flip: ±degrees and ±fraction of the side.
    rotation: float = 0.0
    shift: float = 0.0
    preprocessing: str = "torch"
    shuffle: bool = True
    # Fine-tuning's starting point: the base (VGG16, or its block 5) and top weights, as Ray object
    # refs (put once by the driver, fetched by each worker) or arrays.
    base_weights: Any = None
    top_weights: Any = None
    # The MLflow run rank 0 logs each epoch to (``tracking.start_run``'s handle); None: tracking off.
    tracking: dict[str, str] | None = None


def ema_momentum(requested: float, total_steps: int) -> float:
    """The moving average's momentum for a run of ``total_steps`` (0: off): ``requested``, lowered so the
    average spans (1 / (1 - momentum) steps) at most ``EMA_MAX_SPAN`` of the run. Keras' average starts
    from the first step's weights, so a short run must not export weights that are mostly those."""
    if requested <= 0 or total_steps <= 0:
        return 0.0
    return round(max(0.0, min(requested, 1.0 - 1.0 / (EMA_MAX_SPAN * total_steps))), 6)
