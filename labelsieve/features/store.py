"""On-disk feature store: image embeddings extracted once, reused by every later run.

Layout under ``<cache_dir>/features/<encoder.key>/``::

    meta.json                 what model and preprocessing the vectors come from
    chunk-<id>.npy            float16 (m, d) embeddings of m images
    chunk-<id>.keys.npy       |S16 (m,) content digests (blake2b-128 of the file bytes) of those images
    chunk-<id>.bad.json       {digest: error} for images of that chunk that could not be decoded
    views/<request>.npy       float16 (n, d) memory-mapped array for one request, in its row order

A chunk is committed when its keys file lands (written last, by atomic rename), so an interrupted
extraction resumes from the finished chunks. Vectors are keyed by *file content*: renaming or
moving images, or auditing a different CSV over the same images, reuses them; editing an image
re-extracts it. Content digests are memoised per (path, size, mtime) in ``hashes.sqlite`` so a
rerun does not re-read every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labelsieve.core.defaults import default_cache_dir, default_num_workers
from labelsieve.core.io import atomic_path, atomic_save_npy, atomic_write_text
from labelsieve.core.progress import progress_bar
from labelsieve.data.decode import UnreadableImage, decode_image
from labelsieve.data.hashing import DIGEST_SIZE, ContentHasher
from labelsieve.data.images import LabeledImages


@dataclass
class Features:
    """Embeddings of one request, row-aligned with the images asked for.

    Attributes
    ----------
    vectors : ndarray (memory-mapped) of shape (n, d), float16
        Unreadable rows are zeros.
    ok : ndarray of shape (n,), bool
        False where the image could not be decoded.
    errors : dict of int to str
        Row -> why it could not be decoded.
    digests : list of bytes
        Content digest of each row (equal digests = byte-identical files).
    n_extracted : int
        How many images this call had to run through the model (0 on a warm cache).
    seconds : float
    """

    vectors: np.ndarray
    ok: np.ndarray
    errors: dict[int, str]
    digests: list[bytes]
    n_extracted: int
    seconds: float


class _DecodeDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], transform: Callable, shape: tuple[int, int, int]) -> None:
        self.files, self.transform, self.shape = files, transform, shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            data = self.files[i].read_bytes()
            x = self.transform(decode_image(data, name=str(self.files[i])))
            return x, i, ""
        except (UnreadableImage, OSError) as exc:
            return torch.zeros(self.shape), i, str(exc) or type(exc).__name__
        except Exception as exc:  # a transform failing on a strange image must not stop the run
            return torch.zeros(self.shape), i, f"{self.files[i]}: {type(exc).__name__}: {exc}"


class FeatureStore:
    """Content-addressed cache of one encoder's image embeddings (see the module docstring)."""

    def __init__(self, cache_dir: str | os.PathLike[str], encoder_key: str, *, meta: dict | None = None) -> None:
        self.root = Path(cache_dir).expanduser() / "features" / encoder_key
        (self.root / "views").mkdir(parents=True, exist_ok=True)
        if meta is not None and not (self.root / "meta.json").exists():
            atomic_write_text(self.root / "meta.json", json.dumps(meta, indent=2, default=str))
        self.hasher = ContentHasher(Path(cache_dir).expanduser() / "hashes.sqlite")

    # -- index of committed chunks -------------------------------------------------------------
    def _chunks(self) -> list[str]:
        return sorted(p.name[: -len(".keys.npy")] for p in self.root.glob("chunk-*.keys.npy"))

    def _index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[bytes, str]]:
        """Sorted digests, their chunk number and row, plus all decode errors."""
        keys, chunk_ids, rows = [], [], []
        bad: dict[bytes, str] = {}
        for ci, name in enumerate(self._chunks()):
            k = np.load(self.root / f"{name}.keys.npy")
            keys.append(k)
            chunk_ids.append(np.full(len(k), ci, dtype=np.int32))
            rows.append(np.arange(len(k), dtype=np.int64))
            bf = self.root / f"{name}.bad.json"
            if bf.exists():
                bad.update({bytes.fromhex(h): e for h, e in json.loads(bf.read_text()).items()})
        if not keys:
            return np.zeros(0, dtype=f"S{DIGEST_SIZE}"), np.zeros(0, np.int32), np.zeros(0, np.int64), bad
        allk = np.concatenate(keys)
        order = np.argsort(allk, kind="stable")
        return allk[order], np.concatenate(chunk_ids)[order], np.concatenate(rows)[order], bad

    def _commit_chunk(self, vecs: np.ndarray, digests: list[bytes], bad: dict[bytes, str]) -> None:
        name = f"chunk-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        atomic_save_npy(self.root / f"{name}.npy", vecs.astype(np.float16))
        if bad:
            atomic_write_text(self.root / f"{name}.bad.json", json.dumps({k.hex(): v for k, v in bad.items()}))
        atomic_save_npy(self.root / f"{name}.keys.npy", np.array(digests, dtype=f"S{DIGEST_SIZE}"))

    # -- extraction ------------------------------------------------------------------------------
    def get(
        self,
        files: Sequence[Path],
        encode: Callable[[torch.Tensor], torch.Tensor],
        transform: Callable,
        *,
        image_shape: tuple[int, int, int],
        batch_size: int = 64,
        num_workers: int | None = None,
        chunk_images: int = 2048,
        progress: bool = True,
        on_batch: Callable[[int], None] | None = None,
    ) -> Features:
        """Embeddings of ``files`` (absolute paths), extracting only what the cache lacks.

        ``encode`` maps a preprocessed batch to (B, d) embeddings; ``transform`` is the preprocessing
        (PIL -> tensor) and ``image_shape`` its output shape. Vectors are committed every
        ``chunk_images`` images, so an interruption loses at most that much work. ``on_batch`` is
        called with the number of images done after every batch (tests use it to interrupt).
        """
        t0 = time.perf_counter()
        digests = self.hasher.digests(list(files))
        keys, _, _, bad = self._index()
        uniq: dict[bytes, int] = {}
        for i, d in enumerate(digests):
            uniq.setdefault(d, i)
        have = np.zeros(len(uniq), dtype=bool)
        ulist = list(uniq)
        if len(keys):
            q = np.array(ulist, dtype=f"S{DIGEST_SIZE}")
            pos = np.clip(np.searchsorted(keys, q), 0, len(keys) - 1)
            have = keys[pos] == q
        missing = [uniq[d] for d, h in zip(ulist, have, strict=True) if not h]
        if missing:
            self._extract([files[i] for i in missing], [digests[i] for i in missing], encode, transform,
                          image_shape=image_shape, batch_size=batch_size, num_workers=num_workers,
                          chunk_images=chunk_images, progress=progress, on_batch=on_batch)
            keys, _, _, bad = self._index()
        vectors, ok, errors = self._view(digests)
        return Features(vectors=vectors, ok=ok, errors=errors, digests=digests, n_extracted=len(missing),
                        seconds=time.perf_counter() - t0)

    def _extract(self, files: list[Path], digests: list[bytes], encode, transform, *, image_shape,
                 batch_size: int, num_workers: int | None, chunk_images: int, progress: bool,
                 on_batch: Callable[[int], None] | None) -> None:
        if num_workers is None:
            num_workers = default_num_workers()
        ds = _DecodeDataset(files, transform, image_shape)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                             pin_memory=torch.cuda.is_available(),
                                             persistent_workers=False)
        buf_v: list[np.ndarray] = []
        buf_d: list[bytes] = []
        buf_bad: dict[bytes, str] = {}
        done = 0
        with progress_bar(len(files), "extracting features", enabled=progress) as advance:
            for x, idx, err in loader:
                idx = idx.tolist()
                v = encode(x).float().cpu().numpy()
                for j, e in enumerate(err):
                    if e:
                        v[j] = 0.0
                        buf_bad[digests[idx[j]]] = e
                buf_v.append(v)
                buf_d.extend(digests[i] for i in idx)
                done += len(idx)
                if sum(len(b) for b in buf_v) >= chunk_images:
                    self._commit_chunk(np.concatenate(buf_v), buf_d, buf_bad)
                    buf_v, buf_d, buf_bad = [], [], {}
                advance(len(idx))
                if on_batch is not None:
                    on_batch(done)
        if buf_v:
            self._commit_chunk(np.concatenate(buf_v), buf_d, buf_bad)

    def _view(self, digests: list[bytes]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        keys, chunk_ids, rows, bad = self._index()
        chunks = self._chunks()
        req = hashlib.blake2b(b"".join(digests) + "|".join(chunks).encode(), digest_size=12).hexdigest()
        q = np.array(digests, dtype=f"S{DIGEST_SIZE}")
        pos = np.searchsorted(keys, q)
        if len(keys) == 0 or np.any(pos >= len(keys)) or np.any(keys[np.minimum(pos, len(keys) - 1)] != q):
            raise RuntimeError("feature store is missing vectors it just extracted")
        ok = np.array([d not in bad for d in digests], dtype=bool)
        errors = {i: bad[d] for i, d in enumerate(digests) if d in bad}
        path = self.root / "views" / f"{req}.npy"
        if path.exists():
            return np.load(path, mmap_mode="r"), ok, errors
        dim = np.load(self.root / f"{chunks[0]}.npy", mmap_mode="r").shape[1]
        with atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(digests), dim))
            cid, crow = chunk_ids[pos], rows[pos]
            for ci in np.unique(cid):
                arr = np.load(self.root / f"{chunks[ci]}.npy", mmap_mode="r")
                sel = np.nonzero(cid == ci)[0]
                out[sel] = arr[crow[sel]]
            out.flush()
            del out
        return np.load(path, mmap_mode="r"), ok, errors


def extract_features(images: LabeledImages, encoder: Any, *, cache_dir: str | os.PathLike[str] | None = None,
                     **options: Any) -> Features:
    """Image embeddings of ``images`` with ``encoder`` (an :class:`~labelsieve.models.encoders.Encoder`),
    through the feature store in ``cache_dir`` (default :func:`default_cache_dir`); ``options`` are those of
    :meth:`FeatureStore.get` (``batch_size``, ``num_workers``, ``chunk_images``, ``progress``, ``on_batch``)."""
    store = FeatureStore(cache_dir or default_cache_dir(), encoder.key, meta=encoder.identity)
    size = encoder.image_size
    return store.get([images.abspath(i) for i in range(len(images))], encoder.encode_images, encoder.preprocess,
                     image_shape=(3, size, size), **options)
