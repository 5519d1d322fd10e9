"""Strays: photos of neither class, or out of the data set's distribution.

A photo's stray score is how much farther than typical it sits from the closest class mean, in
robust standard deviations: ``(d - median(d)) / (1.4826 MAD(d))``, ``d`` the cosine distance of its
pooled features to that mean. The class means barely move for a few strays, so strays that resemble
each other are still found, where a nearest-neighbour density misses most (bench/audit_quality.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.audit.pooled import Corpus, normalise

# Flagged above this many robust standard deviations: below every generated stray of bench/audit_quality.py.
STRAY_CUTOFF = 5.0
_MAD_TO_SD = 1.4826


@dataclass
class StrayFindings:
    """Per photo: how far out of place it is (higher: more), and whether that passes the cut-off."""

    score: np.ndarray
    flagged: np.ndarray


def stray_scores(corpus: Corpus) -> StrayFindings:
    """Every photo's stray score and flag (see the module docstring)."""
    present = np.unique(corpus.labels)
    centres = normalise(np.stack([corpus.features[corpus.labels == c].mean(axis=0) for c in present]))
    distance = 1 - (corpus.features @ centres.T).max(axis=1)
    median = np.median(distance)
    spread = _MAD_TO_SD * np.median(np.abs(distance - median))
    score = (distance - median) / max(float(spread), 1e-9)
    return StrayFindings(score=score.astype(np.float32), flagged=score > STRAY_CUTOFF)
