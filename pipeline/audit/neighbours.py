"""Each photo's nearest neighbours by cosine similarity (inner products of unit vectors), with faiss.

faiss (``faiss-cpu``: maintained, wheels for every platform) searches exactly up to ``FLAT_LIMIT``
photos without building or copying an index (``faiss.knn`` over a matrix read straight from Ray's
object store), and above it with an inverted-file index (``IndexIVFFlat``) that visits ``NPROBE`` of
``4 sqrt(n)`` cells: duplicates are far closer to each other than to anything else, so they share a
cell or a probed neighbour cell. hnswlib has no exact mode to check against, and its graph costs
more memory per vector. Queries run in chunks, one Ray task each, against one copy in the object store.
"""

from __future__ import annotations

import math

import numpy as np
import ray

FLAT_LIMIT = 100_000
# Cells searched per query (bench/audit_quality.py --scale found every planted copy at 4, 8 and 16).
NPROBE = 8
CHUNK_ROWS = 20_000
# Within faiss's advised 30-256 training vectors per cell; 10 k-means rounds, not faiss's 25, so that
# training at a million photos costs less than the search.
TRAIN_PER_CELL = 64
KMEANS_ROUNDS = 10
SEED = 0
# The memory an IVF task declares, in multiples of the vectors' bytes (its index copy, the vectors it
# maps, faiss's work; bench/audit_quality.py --scale), so Ray runs only as many as a node holds.
TASK_MEMORY_FACTOR = 3.5


def _search_flat(vectors: np.ndarray, start: int, stop: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss  # deferred: loaded in the Ray tasks that search; the driver never needs it

    return faiss.knn(vectors[start:stop], vectors, k, faiss.METRIC_INNER_PRODUCT)


def _search_index(serialised: np.ndarray, vectors: np.ndarray, start: int, stop: int,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss  # deferred, as in _search_flat

    index = faiss.deserialize_index(serialised)
    index.nprobe = NPROBE
    return index.search(vectors[start:stop], k)


def ivf_index(vectors: np.ndarray) -> np.ndarray:
    """An ``IndexIVFFlat`` over ``vectors`` (inner product), trained on a sample, serialised for the object store."""
    import faiss  # deferred, as in _search_flat

    n, d = vectors.shape
    cells = max(1, int(4 * math.sqrt(n)))
    sample = np.random.default_rng(SEED).choice(n, size=min(n, TRAIN_PER_CELL * cells), replace=False)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cells, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = SEED
    index.cp.niter = KMEANS_ROUNDS
    index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
    index.add(vectors)
    return faiss.serialize_index(index)


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
    # Each row's own position goes, wherever ties put it; a row that did not find itself (an
    # approximate search) drops its last result instead.
    own = ids == np.arange(n)[:, None]
    own[~own.any(axis=1), -1] = True
    return sims[~own].reshape(n, k), ids[~own].reshape(n, k)
