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

import contextlib
import io
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from labelsieve.core.progress import progress_bar
from labelsieve.data import LabeledImages
from labelsieve.data.decode import read_image_bytes, to_rgb
from labelsieve.detectors.common.neighbors import drop_self, knn_search

__all__ = ["CROP_SCALES", "THUMBS_IN_MEMORY_BYTES", "THUMB_SIZE", "candidate_pairs", "connected_groups",
           "near_duplicate_groups", "pair_similarity", "thumbnails", "unit_thumbnails"]

#: Thumbnail side in pixels.
THUMB_SIZE = 16
#: Centre-crop scales tried on either image of a pair.
CROP_SCALES = (1.0, 0.92, 0.84, 0.76)
#: Thumbnails larger than this (3 KB per image: about 350,000 images) are written to a memory map on disk.
THUMBS_IN_MEMORY_BYTES = 1 << 30


def candidate_pairs(x: Any, k: int = 8, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unordered pairs (i < j) where j is among the ``k`` nearest neighbours of i or i among j's; ``x`` is an
    (n, d) array of L2-normalised features or a DetectionContext (read a block at a time).

    Returns
    -------
    pairs : ndarray of shape (m, 2), int64
    similarity : ndarray of shape (m,), float32
        Cosine similarity of the pair's features.
    """
    n = x.n_samples if hasattr(x, "feature_rows") else len(x)
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


def _thumbnail(path: Any) -> np.ndarray | None:
    """(len(CROP_SCALES), THUMB_SIZE² · 3) uint8 pixels of the centre crops, or None when the image (a file, or a
    container member) cannot be decoded. Kept as the resized pixels (3 KB per image), made unit vectors by
    :func:`unit_thumbnails` when compared, so a million images' thumbnails take 3 GB, not 12."""
    try:
        with Image.open(io.BytesIO(read_image_bytes(path))) as im:
            im.draft("RGB", (4 * THUMB_SIZE, 4 * THUMB_SIZE))  # JPEG: decode at a reduced scale, much faster
            im = to_rgb(ImageOps.exif_transpose(im))
            w, h = im.size
            out = np.empty((len(CROP_SCALES), THUMB_SIZE * THUMB_SIZE * 3), dtype=np.uint8)
            for i, s in enumerate(CROP_SCALES):
                box = ((w - w * s) / 2, (h - h * s) / 2, (w + w * s) / 2, (h + h * s) / 2)
                out[i] = np.asarray(im.resize((THUMB_SIZE, THUMB_SIZE), Image.BILINEAR, box=box)).ravel()
            return out
    except Exception:  # PIL raises many types; an image that fails here is simply not compared
        return None


def unit_thumbnails(raw: np.ndarray) -> np.ndarray:
    """uint8 thumbnails (..., THUMB_SIZE² · 3) -> float32 vectors, mean-centred per colour channel, unit norm."""
    t = raw.astype(np.float32).reshape(*raw.shape[:-1], THUMB_SIZE * THUMB_SIZE, 3)
    t = (t - t.mean(axis=-2, keepdims=True)).reshape(raw.shape)
    return t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-6)


def thumbnails(images: LabeledImages, rows: Sequence[int] | np.ndarray, *, num_workers: int | None = None,
               progress: bool = True, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnails of ``images`` rows ``rows``.

    Parameters
    ----------
    out : ndarray of shape (len(images), len(CROP_SCALES), THUMB_SIZE² · 3), uint8, optional
        Where to write them, at the rows' own positions (e.g. a memory map): then ``thumbs`` is ``out``.

    Returns
    -------
    thumbs : ndarray of shape (len(rows), len(CROP_SCALES), THUMB_SIZE² · 3), uint8
        The pixels (:func:`unit_thumbnails` makes them comparable); zeros where ``ok`` is False.
    ok : ndarray of shape (len(rows),), bool
        False where the image could not be decoded.
    """
    rows = np.asarray(rows, dtype=np.int64)
    shape = (len(CROP_SCALES), THUMB_SIZE * THUMB_SIZE * 3)
    target = out if out is not None else np.zeros((len(rows), *shape), dtype=np.uint8)
    at = rows if out is not None else np.arange(len(rows))
    ok = np.zeros(len(rows), dtype=bool)
    workers = num_workers or min(4, os.cpu_count() or 1)
    with progress_bar(len(rows), "near-duplicates: thumbnails", enabled=progress and len(rows) > 0) as advance, \
            ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without holding the GIL
        for i, t in enumerate(pool.map(_thumbnail, (images.locate(int(r)) for r in rows))):
            if t is not None:
                target[at[i]], ok[i] = t, True
            advance()
    return target, ok


def pair_similarity(thumbs: np.ndarray, pairs: np.ndarray, *, block: int = 1 << 15) -> np.ndarray:
    """Best thumbnail correlation of each pair over the crop scales of either side, shape (m,); ``thumbs`` are
    :func:`thumbnails`' uint8 pixels (an array or a memory map), compared ``block`` pairs at a time."""
    sim = np.zeros(len(pairs), dtype=np.float32)
    for i in range(0, len(pairs), block):
        p = pairs[i : i + block]
        a, b = unit_thumbnails(thumbs[p[:, 0]]), unit_thumbnails(thumbs[p[:, 1]])
        crop_a = np.einsum("msd,md->ms", a, b[:, 0])  # a cropped vs b whole
        crop_b = np.einsum("md,msd->ms", a[:, 0], b)  # a whole vs b cropped
        sim[i : i + len(p)] = np.maximum(crop_a.max(axis=1), crop_b.max(axis=1))
    return sim


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


def near_duplicate_groups(images: LabeledImages, x: Any, *, threshold: float, k: int = 8, seed: int = 0,
                          num_workers: int | None = None, progress: bool = True,
                          work_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Near-duplicate groups among ``images`` (see the module docstring).

    Parameters
    ----------
    images : LabeledImages
        The images, row-aligned with ``x``.
    x : ndarray of shape (n, d), or a DetectionContext
        Their L2-normalised features (a context's are read a block at a time).
    threshold : float in (0, 1]
        Thumbnail correlation at or above which a candidate pair is a near-duplicate
        (:data:`labelsieve.core.defaults.DEFAULT_DUPLICATE_THRESHOLD`, chosen by
        ``benchmarks/near_duplicates.py``).
    k : int, default=8
        Feature neighbours per image checked on pixels.
    work_dir : path, optional
        Where the thumbnails go when they exceed :data:`THUMBS_IN_MEMORY_BYTES` (default: the system's
        temporary folder); removed at the end.

    Returns
    -------
    ndarray of shape (n,), int64
        Group id per row, ``-1`` for rows in no group.
    """
    pairs, _ = candidate_pairs(x, k, seed=seed)
    rows = np.unique(pairs)
    shape = (len(images), len(CROP_SCALES), THUMB_SIZE * THUMB_SIZE * 3)
    with contextlib.ExitStack() as stack:
        if int(np.prod(shape)) <= THUMBS_IN_MEMORY_BYTES:
            thumbs = np.zeros(shape, dtype=np.uint8)
        else:  # 3 KB per image: on disk (a memory map) above 1 GiB, so 10M images need 31 GB of disk, not RAM
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="labelsieve-thumbs-", dir=work_dir))
            thumbs = np.lib.format.open_memmap(Path(folder) / "thumbs.npy", mode="w+", dtype=np.uint8, shape=shape)
        ok = np.zeros(len(images), dtype=bool)
        ok[rows] = thumbnails(images, rows, num_workers=num_workers, progress=progress, out=thumbs)[1]
        pairs = pairs[ok[pairs[:, 0]] & ok[pairs[:, 1]]]
        return connected_groups(len(images), pairs[pair_similarity(thumbs, pairs) >= threshold])
