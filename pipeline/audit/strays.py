"""Strays: photos of neither class, or out of the data set's distribution.

A photo's stray score says how much farther it sits from its nearest class centre than the
typical photo does, in robust standard deviations: ``(d - median(d)) / (1.4826 MAD(d))`` with
``d`` the cosine distance of its pooled features to the closest class mean. A photo of neither
class is far from every class mean at once. The class means barely move for a few strays, so
strays that resemble each other are still found, where a nearest-neighbour density misses them
(on bench/audit_quality.py's development corpus, 10 neighbours found 4 of 28 generated strays
among the top 56, the class means all 28). It costs one pass over the features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.audit.pooled import Corpus, normalise

# Flagged above this many robust standard deviations (bench/audit_quality.py's development corpus:
# generated strays scored 5.1 to 10.2; drawings, signs and caged dogs of the sample itself up to 10.9).
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
