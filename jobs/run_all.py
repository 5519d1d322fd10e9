"""The main job: extraction → train_top → finetune → train_scratch → report.md (``python -m jobs.run_all --help``)."""

from __future__ import annotations

import sys
from typing import Sequence

from jobs._cli import run_job
from pipeline.runall import RunAllConfig, run_all


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job."""
    return run_job(RunAllConfig, __doc__, run_all, argv)


if __name__ == "__main__":
    sys.exit(main())
