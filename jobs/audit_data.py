"""The data set doctor: duplicates and leakage, likely wrong labels and strays, with an HTML report (``python -m jobs.audit_data --help``)."""

from jobs._cli import entry
from pipeline.audit.doctor import audit_data
from pipeline.config import AuditConfig

main = entry(AuditConfig, __doc__, audit_data)

if __name__ == "__main__":
    raise SystemExit(main())
