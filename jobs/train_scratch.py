"""Ray Train: the small CNN trained from scratch on augmented images (``python -m jobs.train_scratch --help``)."""

from jobs._cli import entry
from pipeline.config import ScratchConfig
from pipeline.training.scratch import train_scratch

main = entry(ScratchConfig, __doc__, train_scratch)

if __name__ == "__main__":
    raise SystemExit(main())
