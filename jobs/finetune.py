"""Ray Train: VGG16 block 5 + top fine-tuned on cached block-4 outputs or streamed images
(``python -m jobs.finetune --help``)."""

from jobs._cli import entry
from pipeline.config import FinetuneConfig
from pipeline.training.finetune import finetune

main = entry(FinetuneConfig, __doc__, finetune)

if __name__ == "__main__":
    raise SystemExit(main())
