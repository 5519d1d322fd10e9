"""Likely wrong labels: out-of-sample class probabilities from k-fold cross-validation of a logistic
regression on the pooled features (one Ray task per fold, the split drawn ``REPEATS`` times and the
probabilities averaged), then confident learning (cleanlab) flags a photo whose given label is less
likely than the class the others' labels make it look like, ranked by the given label's probability.

Out of sample, since a model scores the photos it was fitted on by the labels it was given, wrong or
not. Logistic regression on 512 pooled numbers is fast and calibrated enough for confident learning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray

from pipeline.audit.pooled import Corpus
from pipeline.errors import DataError

SEED = 0
# Inverse L2 strength on standardised pooled features, and how often the k-fold split is redrawn: on
# bench/audit_quality.py's corpora, weaker regularisation or one draw ranked fewer flipped labels first.
REGULARISATION_C = 0.02
REPEATS = 3
# The memory a fold task declares per photo of the corpus (bench/audit_quality.py --scale), so Ray
# runs only as many folds at once as a node holds.
FOLD_BYTES_PER_PHOTO = 10_000


def _fit_fold(features: np.ndarray, labels: np.ndarray, train: np.ndarray, held: np.ndarray,
              num_classes: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=REGULARISATION_C, max_iter=1000))
    model.fit(features[train], labels[train])
    probs = np.zeros((len(held), num_classes), np.float32)
    probs[:, model.classes_] = model.predict_proba(features[held])
    return probs


def out_of_sample_probabilities(corpus: Corpus, folds: int) -> np.ndarray:
    """``(n, classes)`` probabilities, each photo's the mean of those of the fold models that did not see it."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(corpus.labels, minlength=len(corpus.classes))
    if counts.min() < folds:
        small = [f"{c} ({n})" for c, n in zip(corpus.classes, counts) if n < folds]
        raise DataError(f"--folds {folds} needs at least {folds} photos of every class; {', '.join(small)} "
                        f"has fewer: lower --folds")
    shared = ray.put(corpus.features)
    task = ray.remote(_fit_fold).options(num_cpus=1, memory=FOLD_BYTES_PER_PHOTO * len(corpus))
    held_out, refs = [], []
    for repeat in range(REPEATS):
        split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=SEED + repeat)
        for train, held in split.split(corpus.features, corpus.labels):
            held_out.append(held)
            refs.append(task.remote(shared, corpus.labels, train, held, len(corpus.classes)))
    probs = np.zeros((len(corpus), len(corpus.classes)), np.float32)
    for held, fold_probs in zip(held_out, ray.get(refs)):
        probs[held] += fold_probs / REPEATS
    return probs


@dataclass
class LabelFindings:
    """Per photo: the suggested class (index), the label's quality (low: likely wrong), flagged or not."""

    suggested: np.ndarray
    quality: np.ndarray
    flagged: np.ndarray


def label_issues(labels: np.ndarray, probs: np.ndarray) -> LabelFindings:
    """Confident learning over out-of-sample ``probs``: which given ``labels`` are likely wrong."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    # n_jobs=1: cleanlab's own process pool would fork the Ray driver.
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    return LabelFindings(suggested=probs.argmax(axis=1), quality=quality.astype(np.float32), flagged=flagged)
