"""Ray Train: the top MLP on VGG16 feature shards (``python -m jobs.train_top --help``)."""

from __future__ import annotations

import sys
from typing import Sequence

from jobs._cli import run_job
from pipeline.config import TrainTopConfig
from pipeline.training.top import train_top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job."""
    return run_job(TrainTopConfig, __doc__, train_top, argv)


if __name__ == "__main__":
    sys.exit(main())
