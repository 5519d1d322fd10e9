"""What leakage does to a held-out split's accuracy: its accuracy with and without the photos
that have a duplicate in the training split, from a ``train_top`` model on the same features
when one is given, else from the cross-validation probabilities."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.audit.duplicates import Duplicates
from pipeline.audit.pooled import Corpus, raw_shards
from pipeline.errors import DataError
from pipeline.nets.modelfile import load_classifier, read_metadata

TRAIN = "train"


def leaked(corpus: Corpus, dups: Duplicates) -> np.ndarray:
    """Per photo: whether it is outside the training split and has a duplicate inside it."""
    out = np.zeros(len(corpus), bool)
    for mine, other in ((dups.a, dups.b), (dups.b, dups.a)):
        hit = (corpus.splits[mine] != TRAIN) & (corpus.splits[other] == TRAIN)
        out[mine[hit]] = True
    return out


def accuracy_effect(corpus: Corpus, leaked_rows: np.ndarray, probs: np.ndarray, source: str) -> list[dict[str, Any]]:
    """Per held-out split: photos, leaked photos, and accuracy with and without the leaked ones, from
    ``probs`` (a row per photo of the corpus, NaN where the source gave none)."""
    rows = []
    for split in sorted(set(corpus.splits.tolist()) - {TRAIN}):
        mine = (corpus.splits == split) & ~np.isnan(probs).any(axis=1)
        right = probs.argmax(axis=1) == corpus.labels
        clean = mine & ~leaked_rows
        rows.append({"split": split, "photos": int(mine.sum()), "leaked": int((mine & leaked_rows).sum()),
                     "accuracy": _share(right[mine]), "accuracy_without_leaked": _share(right[clean]),
                     "source": source})
    return rows


def _share(hits: np.ndarray) -> float | None:
    return round(float(hits.mean()), 4) if len(hits) else None


def check_top_model(path: str) -> dict[str, Any]:
    """The metadata of ``--top-model``; DataError unless it is a ``train_top`` model."""
    meta = read_metadata(path)
    if meta["kind"] != "top":
        raise DataError(f"--top-model {path} is a {meta['kind']} model; the leakage effect is measured with a "
                        f"train_top model, whose top runs on the stored features")
    return meta


def top_model_probabilities(path: str, features_dir: str, corpus: Corpus) -> np.ndarray:
    """The held-out photos' class probabilities from the top of a ``train_top`` model, run on their
    stored features (NaN for training photos); DataError for a model of other features."""
    from pipeline.nets import models  # deferred: Keras (seconds to load), only when --top-model is given

    meta, manifest = check_top_model(path), corpus.manifest
    same = {"classes": (meta["classes"], manifest["classes"]), "image size": (meta["image_size"], manifest["image_size"]),
            "weights": (meta["weights"]["sha256"], manifest["weights"]["sha256"]),
            "preprocessing": (meta["preprocessing"], manifest["preprocessing"])}
    differ = [f"{name}: {mine!r} vs {theirs!r}" for name, (mine, theirs) in same.items() if mine != theirs]
    if differ:
        raise DataError(f"--top-model {path} was trained on other features than {features_dir} ({'; '.join(differ)})")
    top = load_classifier(path)[0].get_layer("top")
    probs = np.full((len(corpus), len(corpus.classes)), np.nan, np.float32)
    position = {(s, p): i for i, (s, p) in enumerate(zip(corpus.splits, corpus.paths)) if s != TRAIN}
    for split in sorted({s for s, _ in position}):
        for paths, flat in raw_shards(features_dir, split):
            rows = [position[(split, p)] for p in paths]
            x = flat.reshape(len(rows), *manifest["feature_shape"])
            probs[rows] = models.probabilities(top.predict(x, batch_size=256, verbose=0), len(corpus.classes))
    return probs
