"""The near-duplicate cut-off of the data set doctor, calibrated on generated copies of real photos.

``--photos`` photos per class of the shared sample's validation split are copied into a training
split, and four edited copies of each (``tests/planted.py``: re-encoded at JPEG quality 30-50,
resized to 50-70 %, cropped to 90 %, brightness changed by 10-15 %) into a validation split; the
product's extraction (224 px, the default weights and precision) makes their features, pooled
as the doctor pools them. The distinct photos are the whole shared sample (its extraction in
``--sample-features``, made when missing), whose own duplicates (the pairs above 0.98, looked at:
the same photo) are left out. Printed and written to ``bench/results/audit_calibration.json``: the
cosine similarity of each copy to its original (quantiles per edit), each distinct photo's
similarity to its most similar other photo, and the share of copies and the number of distinct
photos at or above each candidate cut-off; the same without the pooling's square root
(``plain_mean_pooling``).

    python bench/audit_calibration.py [--photos 60] [--work /tmp/audit_calibration]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.result_file import write_result  # noqa: E402
from pipeline.batch.cluster import init_ray  # noqa: E402
from pipeline.batch.extract import run_extraction  # noqa: E402
from pipeline.config import ExtractConfig  # noqa: E402
from pipeline.data.shards import list_rows, read_split  # noqa: E402
from pipeline.audit.pooled import normalise, pool  # noqa: E402
from tests.conftest import REAL_DATA, real_images  # noqa: E402
from tests.planted import EDITS, write_copy  # noqa: E402

CUTS = (0.90, 0.92, 0.93, 0.935, 0.94, 0.95, 0.96)
# Pairs of the shared sample above this are its own duplicates (looked at: the same photo twice).
SAME_PHOTO = 0.98


def build(root: str, per_class: int, seed: int) -> None:
    """Originals under train/, their edited copies (``<stem>.<edit>.jpg``) under validation/."""
    rng = np.random.default_rng(seed)
    for cls in ("cats", "dogs"):
        pool_ = real_images("validation", cls, 400)
        for src in rng.choice(pool_, size=per_class, replace=False):
            name = os.path.basename(src)
            os.makedirs(os.path.join(root, "train", cls), exist_ok=True)
            shutil.copyfile(src, os.path.join(root, "train", cls, name))
            for edit in EDITS:
                write_copy(src, os.path.join(root, "validation", cls, f"{name[:-4]}.{edit}.jpg"), edit, rng)


def plain_mean(flat: np.ndarray, shape: list[int]) -> np.ndarray:
    """The pooling without the doctor's square root, for comparison."""
    h, w, c = shape
    return normalise(flat.reshape(len(flat), h * w, c).mean(axis=1))


def pooled(features_dir: str, split: str, shape: list[int], pooling=pool) -> dict[str, np.ndarray]:
    table = read_split(features_dir, split, ["path", "features"])
    return dict(zip(table.column("path").to_pylist(), pooling(list_rows(table.column("features")), shape)))


def distinct_nearest(sample_features: str, shape: list[int], pooling=pool) -> np.ndarray:
    """Each photo of the sample's similarity to its most similar other photo, its own duplicates left out."""
    vectors = {}
    for split in ("train", "validation"):
        vectors.update(pooled(sample_features, split, shape, pooling))
    matrix = np.stack(list(vectors.values()))
    gram = matrix @ matrix.T
    np.fill_diagonal(gram, -1)
    nearest = gram.max(axis=1)
    return nearest[nearest < SAME_PHOTO]


def measure(features_dir: str, sample_features: str, shape: list[int], pooling=pool) -> dict:
    """Similarities of copies to their originals, and of distinct photos to their nearest other photo."""
    originals = pooled(features_dir, "train", shape, pooling)
    copies = pooled(features_dir, "validation", shape, pooling)
    by_name = {os.path.basename(p): v for p, v in originals.items()}
    copy_sims = {edit: [] for edit in EDITS}
    for path, vector in copies.items():
        stem, edit, _ = os.path.basename(path).rsplit(".", 2)
        copy_sims[edit].append(float(vector @ by_name[f"{stem}.jpg"]))
    distinct = distinct_nearest(sample_features, shape, pooling)
    every_copy = np.concatenate([np.asarray(v) for v in copy_sims.values()])
    quantiles = (0.0, 0.01, 0.05, 0.5)
    return {
        "copies": len(every_copy), "originals": len(originals), "distinct_photos": len(distinct),
        "copy_similarity_quantiles": {e: dict(zip(map(str, quantiles), np.quantile(v, quantiles).round(4).tolist()))
                                      for e, v in copy_sims.items()},
        "distinct_nearest_quantiles": dict(zip(("0.5", "0.99", "1.0"), np.quantile(distinct, (0.5, 0.99, 1.0)).round(4).tolist())),
        "lowest_copies": sorted(round(float(v), 4) for v in every_copy)[:5],
        "at_or_above": {str(c): {"copies_share": round(float((every_copy >= c).mean()), 4),
                                 "distinct_photos": int((distinct >= c).sum())} for c in CUTS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=60, help="originals per class")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", default="/tmp/audit_calibration")
    parser.add_argument("--sample-features", default="/tmp/audit_quality/clean_features",
                        help="the shared sample's extraction (bench/audit_quality.py's; made when missing)")
    args = parser.parse_args()
    root, features = os.path.join(args.work, "root"), os.path.join(args.work, "features")
    if not os.path.isdir(root):
        build(root, args.photos, args.seed)
    init_ray()
    started = time.time()
    manifest = run_extraction(ExtractConfig(data_dir=root, output_dir=features))
    run_extraction(ExtractConfig(data_dir=REAL_DATA, output_dir=args.sample_features))
    figures = {"photos_per_class": args.photos, "seed": args.seed, "extraction_s": round(time.time() - started, 1),
               "precision": manifest["precision"], **measure(features, args.sample_features, manifest["feature_shape"])}
    plain = measure(features, args.sample_features, manifest["feature_shape"], plain_mean)
    figures["plain_mean_pooling"] = {"lowest_copies": plain["lowest_copies"],
                                     "distinct_nearest_quantiles": plain["distinct_nearest_quantiles"],
                                     "at_or_above": plain["at_or_above"]}
    for key, value in figures.items():
        print(f"{key}: {value}")
    write_result("audit_calibration", figures)


if __name__ == "__main__":
    main()
