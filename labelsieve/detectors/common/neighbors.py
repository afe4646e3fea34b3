"""Nearest neighbours of image features among themselves (faiss), for kNN votes and near-duplicates.

Up to :data:`EXACT_LIMIT` rows the search is exact (``IndexFlatIP``: every pair, quadratic in n). Above it
it is approximate and linear in n: an inverted-file index (``IndexIVFScalarQuantizer``, 8-bit codes, so
10M x 512 features take 5 GB instead of 20) with ``4 sqrt(n)`` lists, trained on a sample, of which
``nprobe`` are scanned per query. The features are read in blocks (a float16 memory map is never copied
whole to float32). ``benchmarks/scale.py`` measures the recall of the approximate search against the
exact one; docs/benchmarks.md quotes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np

__all__ = ["EXACT_LIMIT", "drop_self", "exact_neighbours", "knn_search"]

#: Largest n searched exactly.
EXACT_LIMIT = 200_000
#: Lists scanned per query by the approximate index.
NPROBE = 16
_BLOCK = 1 << 15


def _blocks(x: Any, block: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 rows) blocks of an array-like or of a source with ``feature_batches`` (a context)."""
    if hasattr(x, "feature_batches"):
        yield from x.feature_batches(block)
        return
    for i in range(0, len(x), block):
        yield i, np.ascontiguousarray(x[i : i + block], dtype=np.float32)


def _rows(x: Any) -> Callable[[np.ndarray], np.ndarray]:
    if hasattr(x, "feature_rows"):
        return x.feature_rows
    return lambda idx: np.ascontiguousarray(x[idx], dtype=np.float32)


def _shape(x: Any) -> tuple[int, int]:
    if hasattr(x, "feature_rows"):
        return x.n_samples, x.feature_rows(np.arange(1)).shape[1]
    return len(x), x.shape[1]


def knn_search(x: Any, k: int, *, exact_limit: int = EXACT_LIMIT, seed: int = 0, nprobe: int = NPROBE,
               batch: int = _BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """k+1 nearest neighbours by inner product of the rows of ``x`` among themselves.

    Parameters
    ----------
    x : ndarray of shape (n, d), or a DetectionContext
        L2-normalised features (any float dtype; a memory map is read in blocks), or a context whose
        :meth:`~labelsieve.detectors.common.base.DetectionContext.feature_batches` gives them.
    k : int
    exact_limit : int
        Exact search up to this many rows, the approximate index above (see the module docstring).
    seed : int
        Seed of the training sample of the approximate index.
    nprobe : int
        Lists scanned per query by the approximate index.

    Returns
    -------
    sims, idx : ndarray of shape (n, k+1)
        Similarities (float32) and row indices (int64; -1 where fewer than k+1 were found).
    """
    n, d = _shape(x)
    if n <= exact_limit:
        index: Any = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        rs = np.random.default_rng(seed)
        sample = np.sort(rs.choice(n, size=min(n, 64 * nlist), replace=False))
        index.train(_rows(x)(sample))
        index.nprobe = int(nprobe)
    for _, rows in _blocks(x, batch):
        index.add(rows)
    sims = np.empty((n, k + 1), dtype=np.float32)
    idx = np.empty((n, k + 1), dtype=np.int64)
    for i, rows in _blocks(x, batch):
        s, j = index.search(rows, k + 1)
        sims[i : i + len(rows)], idx[i : i + len(rows)] = s, j
    return sims, idx


def exact_neighbours(x: Any, queries: np.ndarray, k: int, *, batch: int = _BLOCK) -> np.ndarray:
    """Exact k+1 nearest rows of ``x`` for the rows ``queries`` (brute force over blocks of ``x``); what the
    recall of :func:`knn_search` is measured against."""
    q = _rows(x)(np.asarray(queries))
    best_s = np.full((len(q), k + 1), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k + 1), -1, dtype=np.int64)
    for start, rows in _blocks(x, batch):
        s = q @ rows.T
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(rows)), s.shape)], axis=1)
        top = np.argpartition(-s_all, k, axis=1)[:, : k + 1]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def drop_self(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from its neighbour list (or the last neighbour if absent)."""
    n = len(idx)
    is_self = idx == np.arange(n)[:, None]
    # keep the first k entries that are not self
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)
