"""Image folders → VGG16 bottleneck features as Parquet shards (``python -m jobs.extract_features --help``)."""

from jobs._cli import entry
from pipeline.batch.extract import run_extraction
from pipeline.config import ExtractConfig


def _run(cfg: ExtractConfig) -> None:
    m = run_extraction(cfg)
    counts = ", ".join(f"{split} {sum(c.values())}" for split, c in m["counts"].items())
    print(f"extracted {m['num_images']} images ({counts}), {m['num_rejects']} rejected, "
          f"{m['precision']}, {m['images_per_s']} images/s -> {m['output_dir']}")


main = entry(ExtractConfig, __doc__, _run)

if __name__ == "__main__":
    raise SystemExit(main())
