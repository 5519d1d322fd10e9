"""The evaluation figures against independent computations."""

from __future__ import annotations

import numpy as np

from pipeline.batch.evaluation import roc_auc


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC by its definition: the share of (positive, negative) pairs ordered right, a tie half."""
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_roc_auc_is_exact_on_random_scores_with_ties():
    rng = np.random.default_rng(27)
    for trial in range(200):
        n = int(rng.integers(2, 400))
        labels = rng.random(n) < rng.uniform(0.05, 0.95)
        if labels.all() or not labels.any():
            labels[0] = not labels[0]
        # Rounded to 1-3 decimals, so many scores tie, within and across the classes; some
        # trials crowd them near 0 and 1 as a confident model's probabilities are.
        scores = np.round(rng.random(n) ** float(rng.choice([1, 8])), int(rng.integers(1, 4)))
        if trial % 2:
            scores = np.where(labels, 1 - scores, scores)
        assert abs(roc_auc(labels, scores) - _pairwise_auc(labels, scores)) < 1e-12, trial


def test_roc_auc_is_none_with_one_class():
    assert roc_auc(np.ones(4, bool), np.arange(4.0)) is None
    assert roc_auc(np.zeros(4, bool), np.arange(4.0)) is None
