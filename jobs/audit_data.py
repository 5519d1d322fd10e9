"""The data set doctor: duplicates and leakage, likely wrong labels and strays, with an HTML report (``python -m jobs.audit_data --help``)."""

from __future__ import annotations

import sys
from typing import Sequence

from jobs._cli import run_job
from pipeline.audit.doctor import audit_data
from pipeline.config import AuditConfig


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job."""
    return run_job(AuditConfig, __doc__, audit_data, argv)


if __name__ == "__main__":
    sys.exit(main())
