"""How good a classifier's probabilities are against known labels: the same figures for a
training job's evaluation and for batch prediction over labelled folders."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); None with one class."""
    # Exact rather than keras.metrics.AUC: its fixed thresholds merge a confident model's probabilities
    # near 0 and 1, and Keras would load TensorFlow (seconds) into the prediction driver.
    labels = np.asarray(labels).astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return None
    _, group, counts = np.unique(np.asarray(scores), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[group]  # 1-based, a tie's ranks averaged
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def evaluate(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Loss, accuracy, per-class precision/recall, confusion matrix and (two classes) ROC AUC."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    n = len(classes)
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        predicted_i, actual_i = confusion[:, i].sum(), confusion[i, :].sum()
        per_class[name] = {
            "precision": float(tp / predicted_i) if predicted_i else None,
            "recall": float(tp / actual_i) if actual_i else None,
            "support": int(actual_i),
        }
    result = {
        "num_samples": int(len(labels)),
        "loss": float(-np.mean(np.log(probs[np.arange(len(labels)), labels]))) if len(labels) else None,
        "accuracy": float((predicted == labels).mean()) if len(labels) else None,
        "per_class": per_class,
        "confusion_matrix": {"classes": list(classes), "rows_true_cols_predicted": confusion.tolist()},
    }
    if n == 2:
        result["roc_auc"] = roc_auc(labels == 1, probs[:, 1])
    return result
