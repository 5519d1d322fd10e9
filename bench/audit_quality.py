"""The data set doctor on the shared sample with planted problems: recall and precision per kind
at the report's default cut-offs, and time; then what it finds on the untouched sample.

The sample (``tests/conftest.py``'s ``REAL_DATA``) is read in place and extracted once into
``--work`` (224 px, the default weights). The planted corpus is a copy of it in ``--work`` with
``--flip`` of the photos moved to the other class's folder, ``--copy`` of them copied into the
other split with one edit each (``tests/planted.py``: low JPEG quality, resized, cropped to 90 %
or brightness changed), and ``--stray`` as many generated images of neither class added to
random folders. Its features are the sample's, updated by the product's incremental extraction
(only the moved, copied and added files are extracted).

Figures (printed and written to ``bench/results/audit_quality.json``):

- labels: the share of flipped photos among the 2 x (number flipped) least likely labels, and
  precision and recall of the photos confident learning flags;
- leakage: the share of planted cross-split copies flagged as leakage pairs, and the share of
  flagged pairs that were not planted (also counting apart those the untouched sample has itself);
- strays: the share of strays among the 2 x (number planted) highest stray scores, and precision
  and recall of the flagged ones;
- the audit's time by stage on both corpora, and what the untouched sample's audit found;
- with ``--scale N``: the stages that grow with the photo count (neighbour search with the IVF
  index above its threshold, duplicate grouping, cross-validation, confident learning, strays)
  timed on N generated 512-d vectors, with the peak memory of the driver and of Ray's task
  workers, and from them (and the real corpus's pooling and hashing per photo) the estimate for
  a million photos.

    python bench/audit_quality.py [--seed 0] [--work /tmp/audit_quality] [--scale 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.process_memory import Sampler  # noqa: E402
from bench.result_file import write_result  # noqa: E402
from pipeline.audit import duplicates, labels, neighbours, strays  # noqa: E402
from pipeline.audit.doctor import NEIGHBOURS  # noqa: E402
from pipeline.audit.pooled import Corpus, normalise  # noqa: E402
from pipeline.audit.doctor import audit_data  # noqa: E402
from pipeline.batch.cluster import init_ray  # noqa: E402
from pipeline.batch.extract import run_extraction  # noqa: E402
from pipeline.config import NEAR_THRESHOLD, AuditConfig, ExtractConfig  # noqa: E402
from tests.conftest import REAL_DATA  # noqa: E402
from tests.planted import EDITS, flip, write_copy, write_strays  # noqa: E402

CLASSES = ("cats", "dogs")


def listing(root: str) -> list[str]:
    """Every photo's relpath under a splits-layout root, sorted."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def plant(sample: str, root: str, seed: int, fractions: dict[str, float]) -> dict[str, list]:
    """Copy ``sample`` to ``root`` with planted problems; what was planted (relpaths under ``root``)."""
    shutil.copytree(sample, root, copy_function=shutil.copy2)  # stamps kept: the extraction reuses their rows
    photos = listing(root)
    rng = np.random.default_rng(seed)
    counts = {kind: round(share * len(photos)) for kind, share in fractions.items()}
    chosen = rng.permutation(len(photos))
    sources = [photos[i] for i in chosen[counts["flip"]:counts["flip"] + counts["copy"]]]
    copies = []
    for i, src in enumerate(sources):
        split, cls, name = src.split("/")
        dst = f"{'validation' if split == 'train' else 'train'}/{cls}/{name[:-4]}.copy.jpg"
        write_copy(os.path.join(root, src), os.path.join(root, dst), EDITS[i % len(EDITS)], rng)
        copies.append([src, dst])
    flipped = [flip(root, photos[i], CLASSES) for i in chosen[:counts["flip"]]]
    strays = []
    for i in range(counts["stray"]):
        split = "train" if rng.random() < 0.7 else "validation"
        folder = os.path.join(root, split, str(rng.choice(CLASSES)))
        path = write_strays(folder, 1, rng, prefix=f"stray{i}")[0]
        strays.append(os.path.relpath(path, root))
    return {"flipped": flipped, "copies": copies, "strays": strays}


def features_of(root: str, output: str, start_from: str | None = None) -> dict:
    """Extract ``root`` into ``output``; from a copy of the finished ``start_from`` when given (incremental)."""
    if start_from and not os.path.exists(output):
        shutil.copytree(start_from, output)
    return run_extraction(ExtractConfig(data_dir=root, output_dir=output))


def ranked_share(table, column: str, truth: set[str], ascending: bool) -> float:
    """The share of ``truth`` among the 2 x len(truth) photos ranked first by ``column``."""
    values = np.asarray(table.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)
    order = np.argsort(values if ascending else -values, kind="stable")[:2 * len(truth)]
    paths = np.asarray(table.column("path").to_pylist(), dtype=object)
    return round(len(truth & set(paths[order].tolist())) / max(len(truth), 1), 4)


def flagged_scores(table, column: str, truth: set[str]) -> dict[str, float | int]:
    """Precision and recall of the photos whose boolean ``column`` is set."""
    flagged = {p for p, f in zip(table.column("path").to_pylist(), table.column(column).to_pylist()) if f}
    hits = len(flagged & truth)
    return {"flagged": len(flagged), "precision": round(hits / max(len(flagged), 1), 4),
            "recall": round(hits / max(len(truth), 1), 4)}


def leakage_pairs(audit_dir: str) -> set[frozenset]:
    pairs = pq.read_table(os.path.join(audit_dir, "pairs.parquet")).to_pylist()
    return {frozenset((p["path_a"], p["path_b"])) for p in pairs if p["leakage"]}


def evaluate(audit_dir: str, truth: dict[str, list], existing: set[frozenset]) -> dict:
    """Recall and precision per kind of what was planted, from the audit's tables."""
    scores = pq.read_table(os.path.join(audit_dir, "scores.parquet"))
    flipped, strays = set(truth["flipped"]), set(truth["strays"])
    planted = {frozenset(pair) for pair in truth["copies"]}
    found = leakage_pairs(audit_dir)
    others = found - planted
    return {
        "planted": {"flipped": len(flipped), "copies": len(planted), "strays": len(strays)},
        "labels": {"flipped_in_top_2x": ranked_share(scores, "label_quality", flipped, ascending=True),
                   **flagged_scores(scores, "label_issue", flipped)},
        "leakage": {"planted_flagged": round(len(found & planted) / max(len(planted), 1), 4),
                    "flagged_pairs": len(found), "not_planted": len(others),
                    "not_planted_share": round(len(others) / max(len(found), 1), 4),
                    "not_planted_also_in_untouched_sample": len(others & existing),
                    "missed": sorted(sorted(p) for p in planted - found)},
        "strays": {"strays_in_top_2x": ranked_share(scores, "stray_score", strays, ascending=False),
                   **flagged_scores(scores, "stray", strays)},
    }


def generated(n: int, seed: int = 0) -> Corpus:
    """``n`` unit vectors like pooled features (non-negative, in 500 clusters of two classes)."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(500, 512))).astype(np.float32)
    cluster = rng.integers(0, 500, size=n)
    vectors = normalise(np.abs(centres[cluster] + rng.normal(scale=0.8, size=(n, 512)).astype(np.float32)))
    return Corpus(paths=np.asarray([f"p{i}" for i in range(n)], dtype=object),
                  splits=np.where(rng.random(n) < 0.8, "train", "validation").astype(object),
                  labels=(cluster % 2).astype(np.int64), classes=["a", "b"], features=vectors, root="", manifest={})


def scale(n: int) -> dict:
    """Seconds and peak memory (MiB) of the stages that grow with the photo count, on ``n`` generated vectors."""
    corpus = generated(n)
    sampler = Sampler(os.getpid(), period=0.5)
    sampler.start()
    seconds, peaks = {}, {}

    def stage(name: str, fn):
        started = time.time()
        out = fn()
        seconds[name] = round(time.time() - started, 2)
        peaks[name] = sampler.peaks(started - sampler.period, time.time() + sampler.period)
        return out

    sims, ids = stage("neighbours", lambda: neighbours.nearest(corpus.features, NEIGHBOURS))
    digests = np.asarray([""] * n, dtype=object)
    stage("duplicates", lambda: duplicates.find_duplicates(corpus, digests, sims, ids, NEAR_THRESHOLD))
    probs = stage("cross_validation", lambda: labels.out_of_sample_probabilities(corpus, 5))
    stage("confident_learning", lambda: labels.label_issues(corpus.labels, probs))
    stage("strays", lambda: strays.stray_scores(corpus))
    sampler.stop.set()
    memory = {name: {kind: peak[kind] for kind in ("driver", "task_workers", "whole_tree") if kind in peak}
              for name, peak in peaks.items()}
    return {"vectors": n, "index": "IVF" if n > neighbours.FLAT_LIMIT else "flat", "seconds": seconds,
            "peak_mib": memory}


def million(measured: dict, real: dict, photos: int) -> dict:
    """The audit of 1,000,000 photos on this machine's cores, from the measured costs: pooling,
    hashing and the stages linear in n scaled by 1e6 / n; the IVF search by (1e6 / n) ** 1.5 (each
    query scans NPROBE of 4 sqrt(n) cells)."""
    ratio = 1e6 / measured["vectors"]
    per_photo = {k: real[k] / photos for k in ("pool", "hash")}
    seconds = {k: round(v * 1e6, 1) for k, v in per_photo.items()}
    seconds.update({k: round(v * (ratio ** 1.5 if k == "neighbours" else ratio), 1)
                    for k, v in measured["seconds"].items()})
    return {"seconds": seconds, "total_hours": round(sum(seconds.values()) / 3600, 2),
            "pooled_features_gib": round(1e6 * 512 * 4 / 2**30, 2)}


def audited(features_dir: str, output_dir: str) -> dict:
    """The audit of a feature folder (redone every time), with its wall time."""
    started = time.time()
    audit = audit_data(AuditConfig(features_dir=features_dir, output_dir=output_dir, overwrite=True))
    audit["wall_s"] = round(time.time() - started, 2)
    return audit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="which photos are flipped and copied, and the strays")
    parser.add_argument("--work", default="/tmp/audit_quality", help="where the corpora, features and audits go")
    parser.add_argument("--flip", type=float, default=0.02)
    parser.add_argument("--copy", type=float, default=0.01)
    parser.add_argument("--stray", type=float, default=0.01)
    parser.add_argument("--scale", type=int, default=0, help="also time the growing stages on this many vectors")
    args = parser.parse_args()
    init_ray()
    clean_features = os.path.join(args.work, "clean_features")
    clean = features_of(REAL_DATA, clean_features)
    clean_audit = audited(clean_features, os.path.join(args.work, "clean_audit"))
    work = os.path.join(args.work, f"planted-{args.seed}")
    root, truth_file = os.path.join(work, "root"), os.path.join(work, "truth.json")
    if not os.path.exists(truth_file):
        shutil.rmtree(work, ignore_errors=True)
        truth = plant(REAL_DATA, root, args.seed, {"flip": args.flip, "copy": args.copy, "stray": args.stray})
        with open(truth_file, "w") as f:
            json.dump(truth, f)
    with open(truth_file) as f:
        truth = json.load(f)
    started = time.time()
    planted = features_of(root, os.path.join(work, "features"), start_from=clean_features)
    update_s = round(time.time() - started, 1)
    audit = audited(os.path.join(work, "features"), os.path.join(work, "audit"))
    figures = {"seed": args.seed, "photos": audit["counts"]["photos"], "precision": planted["precision"],
               **evaluate(os.path.join(work, "audit"), truth, leakage_pairs(os.path.join(args.work, "clean_audit"))),
               "planted_audit": {"wall_s": audit["wall_s"], "timings_s": audit["timings_s"], "counts": audit["counts"]},
               "planted_extraction_update": {"seconds": update_s, "update": planted["update"]},
               "untouched_sample": {"photos": clean["num_images"], "wall_s": clean_audit["wall_s"],
                                    "timings_s": clean_audit["timings_s"], "counts": clean_audit["counts"],
                                    "leakage_effect": clean_audit["leakage_effect"],
                                    "suspects": clean_audit["suspects"]}}
    if args.scale:
        figures["scale"] = scale(args.scale)
        figures["million_estimate"] = million(figures["scale"], clean_audit["timings_s"], clean["num_images"])
    print(json.dumps(figures, indent=2))
    write_result("audit_quality", figures)


if __name__ == "__main__":
    main()
