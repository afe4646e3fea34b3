"""The memo of container indexes: what a WebDataset shard or a Parquet/Arrow file holds, read once.

Indexing a container (:mod:`labelsieve.data.webdataset`, :mod:`labelsieve.data.parquet`) reads it through once:
each sample's name, where its image bytes lie, its label and the content digest of its image. A rerun over the
same container reads the index back instead, so listing a million samples costs one ``stat`` per container and
the load of its index, never a ``stat`` per sample (there are no files to stat).

Layout under ``<cache_dir>/containers/``::

    <key>.npz     the index's arrays (numpy, no pickles)
    <key>.json    the commit, written last: the container's path and stamp, the index's size and SHA-256

``key`` hashes the container's absolute path and what the index depends on (the image and label columns of a
Parquet file). The index is reused only while the container's stamp (size, mtime, ctime, inode, device, as for
file digests: :mod:`labelsieve.data.hashing`) is unchanged and the npz matches its SHA-256; a container modified
in the last :data:`~labelsieve.data.hashing.RACY_SECONDS` before indexing is not memoised. A damaged entry is
removed with a warning and the container indexed again: a cache may be slow, never wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from labelsieve.core.io import atomic_open, atomic_write_text
from labelsieve.data.hashing import RACY_SECONDS, file_stamp

__all__ = ["FORMAT", "IndexMemo", "pack_strings", "unpack_strings"]

#: Bumped when what an index holds changes: older entries are then indexed again.
FORMAT = 2
_SEP = "\0"


def pack_strings(values: Sequence[str]) -> np.ndarray:
    """Strings as one uint8 array of their UTF-8 bytes joined by NUL (no pickle; 1M names in one array)."""
    if any(_SEP in v for v in values):
        raise ValueError("a string holds a NUL character")
    return np.frombuffer(_SEP.join(values).encode("utf-8"), dtype=np.uint8).copy()


def unpack_strings(blob: np.ndarray, n: int) -> list[str]:
    """The ``n`` strings :func:`pack_strings` packed."""
    if n == 0:
        return []
    out = bytes(np.asarray(blob, dtype=np.uint8)).decode("utf-8").split(_SEP)
    if len(out) != n:
        raise ValueError(f"{len(out)} strings packed, {n} expected")
    return out


class IndexMemo:
    """Container indexes memoised on disk (see the module docstring).

    Parameters
    ----------
    cache_dir : path
        The cache root; entries live in ``cache_dir/containers``.
    warn : callable, optional
        Called with a message when an entry was found damaged and removed.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], *, warn: Callable[[str], None] | None = None) -> None:
        self.root = Path(cache_dir).expanduser() / "containers"
        self._warn = warn or (lambda _msg: None)

    def _key(self, path: Path, variant: str) -> str:
        return hashlib.blake2b(f"{FORMAT}|{path.absolute()}|{variant}".encode(), digest_size=16).hexdigest()

    def get(self, path: Path, variant: str = "") -> dict[str, np.ndarray] | None:
        """The memoised index of ``path``, or None (not memoised, container changed, or entry damaged)."""
        key = self._key(path, variant)
        meta_path, data_path = self.root / f"{key}.json", self.root / f"{key}.npz"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._drop(key, f"its record is unreadable ({exc})")
            return None
        try:
            stamp = file_stamp(os.stat(path)).hex()
        except OSError:
            return None
        if meta.get("stamp") != stamp or meta.get("format") != FORMAT:
            return None  # the container changed: index it again (the entry is replaced then)
        try:
            data = data_path.read_bytes()
            if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise ValueError("it does not match its recorded size and SHA-256")
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
            self._drop(key, str(exc))
            return None

    def put(self, path: Path, arrays: dict[str, np.ndarray], *, stamp: bytes, started: float,
            variant: str = "") -> None:
        """Memoise ``arrays`` as the index of ``path`` whose stamp was ``stamp`` when indexing began at ``started``
        (``time.time()``); skipped when the container was modified just before or during indexing."""
        try:
            now = file_stamp(os.stat(path))
        except OSError:
            return
        mtime_ns, ctime_ns = np.frombuffer(stamp, dtype="<i8")[1:3]
        if now != stamp or max(int(mtime_ns), int(ctime_ns)) >= int((started - RACY_SECONDS) * 1e9):
            return
        key = self._key(path, variant)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.root / f"{key}.npz", "wb") as f:
            f.write(data)
        atomic_write_text(self.root / f"{key}.json", json.dumps({
            "format": FORMAT, "container": str(path.absolute()), "stamp": stamp.hex(), "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}))

    def forget(self, path: Path, variant: str = "") -> None:
        """Drop the memoised index of ``path`` (its content was found to differ from the index)."""
        key = self._key(path, variant)
        for suffix in (".json", ".npz"):
            with contextlib.suppress(FileNotFoundError):
                (self.root / f"{key}{suffix}").unlink()

    def _drop(self, key: str, why: str) -> None:
        self._warn(f"container index {self.root / key}.npz is damaged ({why}); removed, the container is indexed "
                   "again")
        for suffix in (".json", ".npz"):
            with contextlib.suppress(FileNotFoundError):
                (self.root / f"{key}{suffix}").unlink()
