"""Near-duplicate images: the same picture resized, re-encoded or slightly cropped, found in two steps.

1. **Candidates from the cached features**: each image's ``k`` nearest neighbours by cosine similarity of
   the audit's image features (faiss, :func:`~labelsieve.detectors.common.neighbors.knn_search`).
2. **Verification on pixels**: each candidate pair is compared on tiny colour thumbnails
   (:data:`THUMB_SIZE` px square, mean-centred per channel, unit norm), the best correlation over
   centre crops of either image at :data:`CROP_SCALES` (so a copy cut 6–24 % smaller still lines up).
   A pair is a near-duplicate when that correlation is at least ``threshold``; a group is a connected
   component of such pairs.

Why not a threshold on the feature similarity alone: measured on 1,000 Imagenette images and 200 altered
copies (``benchmarks/near_duplicates.py``, docs/benchmarks.md), the mini CLIP's features put copies as low
as 0.45 (JPEG quality 15, or crop + resize + quality 30) and distinct pictures of one class as high as
0.90, so no feature threshold finds most copies without joining distinct images; the features are a good
candidate list (every copy is among its original's 8 nearest neighbours) and the thumbnail check separates
the rest. The thumbnail threshold does not depend on the model that made the features.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps

from labelsieve.core.progress import progress_bar
from labelsieve.data import LabeledImages
from labelsieve.data.decode import to_rgb
from labelsieve.detectors.common.neighbors import drop_self, knn_search

__all__ = ["CROP_SCALES", "THUMB_SIZE", "candidate_pairs", "connected_groups", "near_duplicate_groups",
           "pair_similarity", "thumbnails"]

#: Thumbnail side in pixels.
THUMB_SIZE = 16
#: Centre-crop scales tried on either image of a pair.
CROP_SCALES = (1.0, 0.92, 0.84, 0.76)


def candidate_pairs(x: np.ndarray, k: int = 8, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unordered pairs (i < j) where j is among the ``k`` nearest neighbours of i or i among j's.

    Returns
    -------
    pairs : ndarray of shape (m, 2), int64
    similarity : ndarray of shape (m,), float32
        Cosine similarity of the pair's features.
    """
    n = len(x)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    k = min(k, n - 1)
    sims, idx = drop_self(*knn_search(x, k, seed=seed), k)
    a = np.repeat(np.arange(n), k)
    b = idx.ravel()
    s = sims.ravel()
    keep = b >= 0
    lo, hi = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
    pairs, first = np.unique(np.stack([lo, hi], axis=1), axis=0, return_index=True)
    return pairs.astype(np.int64), s[keep][first]


def _thumbnail(path: os.PathLike[str] | str) -> np.ndarray | None:
    """(len(CROP_SCALES), THUMB_SIZE² · 3) unit vectors, or None when the file cannot be decoded."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (4 * THUMB_SIZE, 4 * THUMB_SIZE))  # JPEG: decode at a reduced scale, much faster
            im = to_rgb(ImageOps.exif_transpose(im))
            w, h = im.size
            out = np.empty((len(CROP_SCALES), THUMB_SIZE * THUMB_SIZE * 3), dtype=np.float32)
            for i, s in enumerate(CROP_SCALES):
                box = ((w - w * s) / 2, (h - h * s) / 2, (w + w * s) / 2, (h + h * s) / 2)
                t = np.asarray(im.resize((THUMB_SIZE, THUMB_SIZE), Image.BILINEAR, box=box), dtype=np.float32)
                t = (t - t.reshape(-1, 3).mean(axis=0)).ravel()
                out[i] = t / max(float(np.linalg.norm(t)), 1e-6)
            return out
    except Exception:  # PIL raises many types; an image that fails here is simply not compared
        return None


def thumbnails(images: LabeledImages, rows: Sequence[int] | np.ndarray, *, num_workers: int | None = None,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnails of ``images`` rows ``rows``.

    Returns
    -------
    thumbs : ndarray of shape (len(rows), len(CROP_SCALES), THUMB_SIZE² · 3), float32
    ok : ndarray of shape (len(rows),), bool
        False where the image could not be decoded (its thumbnails are zeros).
    """
    rows = np.asarray(rows, dtype=np.int64)
    out = np.zeros((len(rows), len(CROP_SCALES), THUMB_SIZE * THUMB_SIZE * 3), dtype=np.float32)
    ok = np.zeros(len(rows), dtype=bool)
    workers = num_workers or min(4, os.cpu_count() or 1)
    with progress_bar(len(rows), "near-duplicates: thumbnails", enabled=progress and len(rows) > 0) as advance, \
            ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without holding the GIL
        for i, t in enumerate(pool.map(_thumbnail, (images.abspath(int(r)) for r in rows))):
            if t is not None:
                out[i], ok[i] = t, True
            advance()
    return out, ok


def pair_similarity(thumbs: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Best thumbnail correlation of each pair over the crop scales of either side, shape (m,)."""
    if len(pairs) == 0:
        return np.zeros(0, dtype=np.float32)
    a, b = thumbs[pairs[:, 0]], thumbs[pairs[:, 1]]
    crop_a = np.einsum("msd,md->ms", a, b[:, 0])  # a cropped vs b whole
    crop_b = np.einsum("md,msd->ms", a[:, 0], b)  # a whole vs b cropped
    return np.maximum(crop_a.max(axis=1), crop_b.max(axis=1))


def connected_groups(n: int, pairs: np.ndarray) -> np.ndarray:
    """Group id per row (``-1`` alone) of the connected components of ``pairs``; ids 0, 1, … in order of
    each group's first row."""
    groups = np.full(n, -1, dtype=np.int64)
    if len(pairs) == 0:
        return groups
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members = np.unique(pairs)
    roots = np.array([find(int(i)) for i in members])
    _, first = np.unique(roots, return_index=True)
    number = {int(r): g for g, r in enumerate(roots[np.sort(first)])}
    groups[members] = [number[int(r)] for r in roots]
    return groups


def near_duplicate_groups(images: LabeledImages, x: np.ndarray, *, threshold: float, k: int = 8, seed: int = 0,
                          num_workers: int | None = None, progress: bool = True) -> np.ndarray:
    """Near-duplicate groups among ``images`` (see the module docstring).

    Parameters
    ----------
    images : LabeledImages
        The images, row-aligned with ``x``.
    x : ndarray of shape (n, d)
        Their L2-normalised features.
    threshold : float in (0, 1]
        Thumbnail correlation at or above which a candidate pair is a near-duplicate
        (:data:`labelsieve.core.defaults.DEFAULT_DUPLICATE_THRESHOLD`, chosen by
        ``benchmarks/near_duplicates.py``).
    k : int, default=8
        Feature neighbours per image checked on pixels.

    Returns
    -------
    ndarray of shape (n,), int64
        Group id per row, ``-1`` for rows in no group.
    """
    pairs, _ = candidate_pairs(x, k, seed=seed)
    rows = np.unique(pairs)
    thumbs = np.zeros((len(images), len(CROP_SCALES), THUMB_SIZE * THUMB_SIZE * 3), dtype=np.float32)
    ok = np.zeros(len(images), dtype=bool)
    thumbs[rows], ok[rows] = thumbnails(images, rows, num_workers=num_workers, progress=progress)
    keep = ok[pairs[:, 0]] & ok[pairs[:, 1]]
    pairs = pairs[keep]
    return connected_groups(len(images), pairs[pair_similarity(thumbs, pairs) >= threshold])
