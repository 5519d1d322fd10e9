"""Ray Train: the small CNN trained from scratch on augmented images (``python -m jobs.train_scratch --help``)."""

from __future__ import annotations

import sys
from typing import Sequence

from jobs._cli import run_job
from pipeline.config import ScratchConfig
from pipeline.training.scratch import train_scratch


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job."""
    return run_job(ScratchConfig, __doc__, train_scratch, argv)


if __name__ == "__main__":
    sys.exit(main())
