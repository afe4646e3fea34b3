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
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from labelsieve.data import LabeledImages, UnreadableImage, decode_image
from labelsieve.progress import progress_bar

DIGEST_SIZE = 16


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def default_cache_dir() -> Path:
    """``$LABELSIEVE_CACHE`` or ``~/.cache/labelsieve``."""
    env = os.environ.get("LABELSIEVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "labelsieve"


class ContentHasher:
    """blake2b-128 digests of files, memoised by (absolute path, size, mtime_ns) in SQLite."""

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self.db_path = db_path
        with self._connect() as con:
            con.execute("CREATE TABLE IF NOT EXISTS h (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, "
                        "digest BLOB)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=60)

    @staticmethod
    def _digest_file(path: str) -> bytes:
        h = hashlib.blake2b(digest_size=DIGEST_SIZE)
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            h.update(b"\0unreadable\0" + path.encode())
        return h.digest()

    def digests(self, paths: Sequence[Path], *, threads: int = 8) -> list[bytes]:
        stats = []
        for p in paths:
            try:
                st = os.stat(p)
                stats.append((st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append((-1, -1))
        keys = [str(p) for p in paths]
        known: dict[str, tuple[int, int, bytes]] = {}
        with self._connect() as con:
            for i in range(0, len(keys), 900):
                q = keys[i : i + 900]
                rows = con.execute(f"SELECT path, size, mtime, digest FROM h WHERE path IN ({','.join('?' * len(q))})",
                                   q).fetchall()
                known.update({r[0]: (r[1], r[2], r[3]) for r in rows})
        out: list[bytes | None] = [None] * len(keys)
        todo = []
        for i, (k, st) in enumerate(zip(keys, stats, strict=True)):
            hit = known.get(k)
            if hit is not None and (hit[0], hit[1]) == st and st[0] >= 0:
                out[i] = bytes(hit[2])
            else:
                todo.append(i)
        if todo:
            with ThreadPoolExecutor(max_workers=threads) as ex:
                for i, d in zip(todo, ex.map(lambda j: self._digest_file(keys[j]), todo), strict=True):
                    out[i] = d
            with self._connect() as con:
                con.executemany("INSERT OR REPLACE INTO h VALUES (?, ?, ?, ?)",
                                [(keys[i], stats[i][0], stats[i][1], out[i]) for i in todo if stats[i][0] >= 0])
        return [d for d in out if d is not None]


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
            num_workers = min(8, max(0, (os.cpu_count() or 1)))
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
        tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:8]}.tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(digests), dim))
        cid, crow = chunk_ids[pos], rows[pos]
        for ci in np.unique(cid):
            arr = np.load(self.root / f"{chunks[ci]}.npy", mmap_mode="r")
            sel = np.nonzero(cid == ci)[0]
            out[sel] = arr[crow[sel]]
        out.flush()
        del out
        os.replace(tmp, path)
        return np.load(path, mmap_mode="r"), ok, errors


def extract_features(
    images: LabeledImages,
    encoder,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    chunk_images: int = 2048,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Features:
    """Image embeddings of ``images`` with ``encoder`` (an :class:`~labelsieve.models.encoders.Encoder`),
    through the feature store in ``cache_dir`` (default :func:`default_cache_dir`)."""
    store = FeatureStore(cache_dir or default_cache_dir(), encoder.key, meta=encoder.identity)
    size = encoder.image_size
    return store.get([images.abspath(i) for i in range(len(images))], encoder.encode_images, encoder.preprocess,
                     image_shape=(3, size, size), batch_size=batch_size, num_workers=num_workers,
                     chunk_images=chunk_images, progress=progress, on_batch=on_batch)
