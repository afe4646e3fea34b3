"""Nearest neighbours of image features among themselves (faiss), for kNN votes and near-duplicates."""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["EXACT_LIMIT", "drop_self", "knn_search"]

EXACT_LIMIT = 200_000


def knn_search(x: np.ndarray, k: int, *, exact_limit: int = EXACT_LIMIT, seed: int = 0,
               batch: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """k+1 nearest neighbours by inner product of rows of ``x`` (float32, normalised) among
    themselves. Exact (``IndexFlatIP``) up to ``exact_limit`` rows, IVF above it. Returns
    (similarities, indices), each (n, k+1)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n <= exact_limit:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(n))
        quant = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rs = np.random.default_rng(seed)
        train = x[rs.choice(n, size=min(n, 64 * nlist), replace=False)]
        index.train(train)
        index.nprobe = 16
    index.add(x)
    sims = np.empty((n, k + 1), dtype=np.float32)
    idx = np.empty((n, k + 1), dtype=np.int64)
    for i in range(0, n, batch):
        s, j = index.search(x[i : i + batch], k + 1)
        sims[i : i + batch], idx[i : i + batch] = s, j
    return sims, idx


def drop_self(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from its neighbour list (or the last neighbour if absent)."""
    n = len(idx)
    is_self = idx == np.arange(n)[:, None]
    # keep the first k entries that are not self
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)
