"""The main job: extraction → train_top → finetune → train_scratch → report.md (``python -m jobs.run_all --help``)."""

from jobs._cli import entry
from pipeline.runall import RunAllConfig, run_all

main = entry(RunAllConfig, __doc__, run_all)

if __name__ == "__main__":
    raise SystemExit(main())
