"""Image folders → VGG16 bottleneck features as Parquet shards (``python -m jobs.extract_features --help``)."""

from __future__ import annotations

import sys
from typing import Sequence

from jobs._cli import run_job
from pipeline.batch.extract import run_extraction
from pipeline.config import ExtractConfig


def _run(cfg: ExtractConfig) -> None:
    m = run_extraction(cfg)
    counts = ", ".join(f"{split} {sum(c.values())}" for split, c in m["counts"].items())
    print(f"extracted {m['num_images']} images ({counts}), {m['num_rejects']} rejected, "
          f"{m['precision']}, {m['images_per_s']} images/s -> {m['output_dir']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the extraction job."""
    return run_job(ExtractConfig, __doc__, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
