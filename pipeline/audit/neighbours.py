"""Each photo's nearest neighbours by cosine similarity (inner products of unit vectors), with faiss.

Why faiss (``faiss-cpu``): maintained, wheels for every platform on PyPI, exact inner-product
search without building or copying an index (``faiss.knn`` is ``IndexFlatIP``'s search over a
matrix the task reads straight from Ray's object store), and an inverted-file index
(``IndexIVFFlat``) for large sets whose search visits ``NPROBE`` of ``4 sqrt(n)`` cells instead of
every vector. hnswlib would also do, but has no exact mode to check the approximate one against,
and its graph costs more memory per vector than the inverted lists.

Up to ``FLAT_LIMIT`` photos the search is exact; above it, IVF (duplicates are far closer to
each other than to anything else, so they share a cell or a probed neighbour cell). Queries are
searched in chunks, one Ray task each, against one copy of the vectors or the index in the
object store.
"""

from __future__ import annotations

import math

import numpy as np
import ray

FLAT_LIMIT = 100_000
# Cells searched per query. On 200,000 generated vectors (bench/audit_quality.py --scale), planted
# copies at similarity 0.91-0.93 (below the near-duplicate cut-off) were all found at 4, 8 and 16.
NPROBE = 8
CHUNK_ROWS = 20_000
# faiss advises 30 to 256 training vectors per cell; 64 and 10 k-means rounds keep training short
# at a million photos (it cost more than the search itself with faiss's default 25 rounds).
TRAIN_PER_CELL = 64
KMEANS_ROUNDS = 10
SEED = 0
# The memory an IVF task declares, in multiples of the vectors' bytes (its copy of the index, the
# vectors it maps, faiss's work; bench/audit_quality.py --scale: 3.3 on 200,000 vectors besides the
# worker itself): Ray then runs only as many at once as a node holds.
TASK_MEMORY_FACTOR = 3.5


def _search_flat(vectors: np.ndarray, start: int, stop: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    return faiss.knn(vectors[start:stop], vectors, k, faiss.METRIC_INNER_PRODUCT)


def _search_index(serialised: np.ndarray, vectors: np.ndarray, start: int, stop: int,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.deserialize_index(serialised)
    index.nprobe = NPROBE
    return index.search(vectors[start:stop], k)


def ivf_index(vectors: np.ndarray) -> np.ndarray:
    """An ``IndexIVFFlat`` over ``vectors`` (inner product), trained on a sample, serialised for the object store."""
    import faiss

    n, d = vectors.shape
    cells = max(1, int(4 * math.sqrt(n)))
    sample = np.random.default_rng(SEED).choice(n, size=min(n, TRAIN_PER_CELL * cells), replace=False)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cells, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = SEED
    index.cp.niter = KMEANS_ROUNDS
    index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
    index.add(vectors)
    serialised = faiss.serialize_index(index)
    del index
    return serialised


def nearest(vectors: np.ndarray, k: int, flat_limit: int = FLAT_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """``(similarities, indices)``, each ``(n, k)``: every row's ``k`` nearest other rows of the
    unit-length ``vectors``, most similar first (fewer when there are fewer rows; -1 pads)."""
    n = len(vectors)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    shared = ray.put(vectors)
    if n <= flat_limit:
        task, args = ray.remote(_search_flat).options(num_cpus=1), (shared,)
    else:
        # Built in a task, so the driver holds the vectors only; each search task deserialises its
        # own copy of the index and reads the vectors it searches in place.
        memory = int(TASK_MEMORY_FACTOR * vectors.nbytes)
        index = ray.remote(ivf_index).options(num_cpus=1, memory=memory).remote(shared)
        task, args = ray.remote(_search_index).options(num_cpus=1, memory=memory), (index, shared)
    # k + 1: a row finds itself (or an exact copy ranked before it), which is taken out below.
    found = ray.get([task.remote(*args, start, min(start + CHUNK_ROWS, n), k + 1) for start in range(0, n, CHUNK_ROWS)])
    sims = np.concatenate([s for s, _ in found])
    ids = np.concatenate([i for _, i in found]).astype(np.int64)
    return _without_self(sims, ids, k)


def _without_self(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` results other than the row itself (its own position, wherever ties put it)."""
    own = ids == np.arange(len(ids))[:, None]
    # A row that did not find itself (an approximate search) drops its last result instead.
    own[~own.any(axis=1), -1] = True
    keep = ~own
    return sims[keep].reshape(len(ids), k), ids[keep].reshape(len(ids), k)
