"""Ray Train: the top MLP on VGG16 feature shards (``python -m jobs.train_top --help``)."""

from jobs._cli import entry
from pipeline.config import TrainTopConfig
from pipeline.training.top import train_top

main = entry(TrainTopConfig, __doc__, train_top)

if __name__ == "__main__":
    raise SystemExit(main())
