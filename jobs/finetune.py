"""Ray Train: VGG16 block 5 + top fine-tuned on cached block-4 outputs or streamed images
(``python -m jobs.finetune --help``)."""

from __future__ import annotations

import sys
from typing import Sequence

from jobs._cli import run_job
from pipeline.config import FinetuneConfig
from pipeline.training.finetune import finetune


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job."""
    return run_job(FinetuneConfig, __doc__, finetune, argv)


if __name__ == "__main__":
    sys.exit(main())
