"""The doctor's findings in one place: every photo's scores as a table, the counts, and the ranked
suspects of each kind that the page shows and ``suspects.txt`` lists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.audit.duplicates import Duplicates
from pipeline.audit.labels import LabelFindings
from pipeline.audit.leakage import TRAIN
from pipeline.audit.pooled import Corpus
from pipeline.audit.strays import StrayFindings


@dataclass
class Findings:
    """What every check found over one corpus (row-aligned with it)."""

    digests: np.ndarray  # sha256 of each file ("" when unreadable)
    sims: np.ndarray  # (n, k) similarities of each photo's nearest neighbours
    ids: np.ndarray  # (n, k) their rows
    dups: Duplicates
    probs: np.ndarray  # (n, classes) out-of-sample probabilities
    labels: LabelFindings
    strays: StrayFindings
    leaked: np.ndarray  # held-out photos with a duplicate in the training split
    effect: list[dict[str, Any]]


def scores_table(corpus: Corpus, f: Findings) -> pa.Table:
    """One row per photo: its classes, every check's score and flag, and its class probabilities."""
    classes = np.asarray(corpus.classes, dtype=object)
    has_neighbour = f.ids.shape[1] > 0
    nearest = f.ids[:, 0] if has_neighbour else np.full(len(corpus), -1)
    columns = {
        "path": corpus.paths.tolist(), "split": corpus.splits.tolist(), "class_name": classes[corpus.labels].tolist(),
        "label": pa.array(corpus.labels, pa.int32()), "suggested_class": classes[f.labels.suggested].tolist(),
        "label_quality": f.labels.quality, "label_issue": f.labels.flagged,
        "stray_score": f.strays.score.astype(np.float32), "stray": f.strays.flagged,
        "duplicate_group": f.dups.group, "leaked": f.leaked,
        "nearest_path": pa.array([corpus.paths[i] if i >= 0 else None for i in nearest], pa.string()),
        "nearest_similarity": (f.sims[:, 0] if has_neighbour else np.full(len(corpus), np.nan)).astype(np.float32),
        "sha256": f.digests.tolist(),
    }
    columns.update({f"prob_{name}": f.probs[:, i] for i, name in enumerate(corpus.classes)})
    return pa.table(columns)


def leakage_pairs(f: Findings) -> np.ndarray:
    """Positions in ``f.dups`` of the pairs across splits, most similar first."""
    cross = np.flatnonzero(f.dups.cross_split)
    return cross[np.argsort(-f.dups.similarity[cross], kind="stable")]


def duplicate_groups(corpus: Corpus, f: Findings) -> list[np.ndarray]:
    """Each duplicate group's rows; groups across splits first, then the larger, then the closer."""
    groups: list[np.ndarray] = [np.flatnonzero(f.dups.group == g) for g in range(int(f.dups.group.max(initial=-1)) + 1)]
    best = np.zeros(len(groups))
    np.maximum.at(best, f.dups.group[f.dups.a], f.dups.similarity)
    def key(g: int) -> tuple:
        return (len(set(corpus.splits[groups[g]].tolist())) == 1, -len(groups[g]), -best[g])
    return [groups[g] for g in sorted(range(len(groups)), key=key)]


def label_suspects(f: Findings) -> np.ndarray:
    """Rows whose label confident learning flags, least likely label first."""
    flagged = np.flatnonzero(f.labels.flagged)
    return flagged[np.argsort(f.labels.quality[flagged], kind="stable")]


def stray_suspects(f: Findings) -> np.ndarray:
    """Rows flagged as strays, most out of place first."""
    flagged = np.flatnonzero(f.strays.flagged)
    return flagged[np.argsort(-f.strays.score[flagged], kind="stable")]


def suspects(corpus: Corpus, f: Findings, top_k: int) -> list[str]:
    """The stored paths a cleaned run would leave out, top ``top_k`` of each kind: the training copy
    of each leakage pair, all but one photo of each duplicate group (one outside the training split
    is kept, so the held-out split keeps its photo), flagged labels and flagged strays."""
    rows: list[int] = []
    for pair in leakage_pairs(f)[:top_k]:
        a, b = f.dups.a[pair], f.dups.b[pair]
        rows.append(a if corpus.splits[a] == TRAIN or (corpus.splits[b] != TRAIN and corpus.splits[a] > corpus.splits[b]) else b)
    for members in duplicate_groups(corpus, f)[:top_k]:
        outside = [m for m in members if corpus.splits[m] != TRAIN]
        keep = outside[0] if outside else members[0]
        rows += [m for m in members if m != keep]
    rows += label_suspects(f)[:top_k].tolist() + stray_suspects(f)[:top_k].tolist()
    return [str(corpus.paths[r]) for r in dict.fromkeys(int(r) for r in rows)]


def summary_counts(corpus: Corpus, f: Findings) -> dict[str, Any]:
    """The headline counts of the page and of ``audit.json``."""
    splits, counts = np.unique(corpus.splits.astype(str), return_counts=True)
    return {"photos": int(len(corpus)), "photos_per_split": dict(zip(splits.tolist(), counts.tolist())),
            "exact_duplicate_pairs": int(f.dups.exact.sum()),
            "near_duplicate_pairs": int((~f.dups.exact).sum()),
            "duplicate_groups": int(f.dups.group.max(initial=-1) + 1),
            "leakage_pairs": int(f.dups.cross_split.sum()),
            "leaked_held_out_photos": int(f.leaked.sum()),
            "label_issues": int(f.labels.flagged.sum()), "strays": int(f.strays.flagged.sum())}
