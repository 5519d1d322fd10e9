"""Duplicates and leakage: the same file twice (exact: the sha256 of its bytes, read in Ray tasks of
``HASH_BLOCK`` files), or a re-encoded, resized, cropped or lightly edited copy (near: cosine similarity
of pooled features at or above a threshold, among each photo's ``neighbours``), grouped. Pairs across
splits are leakage: a validation photo whose copy is trained on inflates validation accuracy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from pipeline import names
from pipeline.audit.pooled import Corpus
from pipeline.data import storage
from pipeline.images.decode import DecodeError, read_bytes

HASH_BLOCK = 512


def _hash_block(root: str, paths: list[str], max_pixels: int) -> list[str]:
    digests = []
    for path in paths:
        try:
            digests.append(hashlib.sha256(read_bytes(storage.join(root, path), max_pixels)).hexdigest())
        except DecodeError:
            digests.append("")  # gone since the extraction: it has no exact duplicate to report
    return digests


def content_hashes(corpus: Corpus, max_pixels: int) -> np.ndarray:
    """The sha256 of every photo's file (empty where it can no longer be read)."""
    root = names.escape(corpus.root)
    task = ray.remote(_hash_block).options(num_cpus=1)
    paths = [str(p) for p in corpus.paths]
    blocks = [task.remote(root, paths[i:i + HASH_BLOCK], max_pixels) for i in range(0, len(paths), HASH_BLOCK)]
    return np.asarray([d for block in ray.get(blocks) for d in block], dtype=object)


@dataclass
class Duplicates:
    """The pairs found (row indices ``a`` < ``b`` into the corpus) and the groups they join."""

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray
    exact: np.ndarray  # same file bytes
    cross_split: np.ndarray  # leakage
    group: np.ndarray  # per photo: its duplicate group, -1 when it has no duplicate

    def table(self, corpus: Corpus) -> pa.Table:
        """The pairs as data: both stored paths and splits, similarity, exact, leakage; leakage first."""
        order = np.lexsort((-self.similarity, ~self.cross_split))
        a, b = self.a[order], self.b[order]
        return pa.table({"path_a": corpus.paths[a].tolist(), "split_a": corpus.splits[a].tolist(),
                         "path_b": corpus.paths[b].tolist(), "split_b": corpus.splits[b].tolist(),
                         "similarity": self.similarity[order].astype(np.float32), "exact": self.exact[order],
                         "leakage": self.cross_split[order], "group": self.group[a]})


def _exact_pairs(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each exact copy paired with the first photo of its digest (a star per group: m - 1 pairs, not m²/2)."""
    known = digests != ""
    rows = np.flatnonzero(known)
    _, first, inverse = np.unique(digests[known].astype(str), return_index=True, return_inverse=True)
    heads = rows[first][inverse]
    copies = heads != rows
    return heads[copies], rows[copies]


def find_duplicates(corpus: Corpus, digests: np.ndarray, sims: np.ndarray, ids: np.ndarray,
                    threshold: float) -> Duplicates:
    """Pairs that are exact copies or whose similarity is at least ``threshold`` (from each photo's
    neighbours ``sims``/``ids``), grouped into connected components."""
    # Deferred: scipy's sparse graphs take a fifth of a second to load, for a run that found duplicates.
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(corpus)
    rows, cols = np.nonzero(sims >= threshold)
    exact_a, exact_b = _exact_pairs(digests)
    a = np.concatenate([rows, exact_a]).astype(np.int64)
    b = np.concatenate([ids[rows, cols], exact_b]).astype(np.int64)
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), axis=0)
    a, b = pairs[:, 0], pairs[:, 1]
    similarity = np.einsum("ij,ij->i", corpus.features[a], corpus.features[b])
    exact = (digests[a] == digests[b]) & (digests[a] != "")
    components = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)[1]
    group = np.full(n, -1, np.int64)
    member = np.isin(np.arange(n), pairs)
    # Groups numbered 0.. in the order of their first photo, so the same corpus gives the same numbers.
    _, renumbered = np.unique(components[member], return_inverse=True)
    group[member] = renumbered
    return Duplicates(a=a, b=b, similarity=np.clip(similarity, -1, 1), exact=exact,
                      cross_split=corpus.splits[a] != corpus.splits[b], group=group)
