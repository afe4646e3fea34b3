"""Content digests of image files, memoised so a rerun does not re-read every file.

The memo is a cache, so it may only ever be slow, never wrong. A digest is reused only when the file's
``(size, mtime_ns, ctime_ns, inode, device)`` are all unchanged since it was computed: writing to a file,
restoring its mtime afterwards (``touch -d``, ``cp -p``, ``rsync -t``), or replacing it by a rename all
change its ctime or inode, which no user command can set back. Files changed in the last
:data:`RACY_SECONDS` before they were hashed are not memoised (they could still change within the
clock's granularity). A memo database that cannot be read (truncated, corrupted) is rebuilt with a
warning.

Speed (``benchmarks/hashing.py``, docs/benchmarks.md §12): files are hashed on a thread pool, 256 files per
task, and the new digests written in one transaction; 100,000 files of 2 KB take ~11 s with an empty memo and
~2 s when every digest is memoised (a stat and one indexed lookup per 900 paths). The memo keeps SQLite's
rollback journal rather than WAL: WAL needs shared memory between processes, which the network filesystems
that hold a multi-machine job's cache do not provide; each process writes once, so the journal costs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import struct
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from labelsieve.core.paths import open_regular

DIGEST_SIZE = 16
#: Files whose mtime or ctime is this recent when hashed are hashed again next time.
RACY_SECONDS = 2.0
_TABLE = "file_digests"
_STAMP = struct.Struct("<5q")
_BLOCK = 1 << 20
#: Files hashed per thread-pool task.
_TASK = 256


def digest_bytes(data: bytes) -> bytes:
    """blake2b-128 of ``data``: the content key of an image (equal digests = byte-identical files)."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def digest_file(path: str | os.PathLike[str], *, size: int = DIGEST_SIZE) -> bytes:
    """blake2b (``size`` bytes) of a file's bytes, read in 1 MiB blocks (raises OSError, also for a FIFO, device or
    other file that is not a regular one: :func:`labelsieve.core.paths.open_regular`)."""
    h = hashlib.blake2b(digest_size=size)
    with open_regular(path) as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.digest()


def digest_list(digests: np.ndarray) -> list[bytes]:
    """A ``S16`` array of digests as 16-byte ``bytes`` (numpy's own conversion drops trailing NUL bytes)."""
    raw = np.ascontiguousarray(digests, dtype=f"S{DIGEST_SIZE}").tobytes()
    return [raw[i: i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE)]


def file_stamp(st: os.stat_result) -> bytes:
    """What must be unchanged for a memoised digest (or container index) to be reused: size, mtime, ctime, inode,
    device."""
    return _STAMP.pack(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino & (2**63 - 1), st.st_dev & (2**63 - 1))


class ContentHasher:
    """blake2b-128 digests of files, memoised in SQLite by path and the file's stat stamp (module docstring).

    Parameters
    ----------
    db_path : Path
        The memo database (created if missing; rebuilt if unreadable).
    warn : callable, optional
        Called with a message when the memo had to be rebuilt (default: ignore).
    """

    def __init__(self, db_path: Path, *, warn: Callable[[str], None] | None = None) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self.db_path = db_path
        self._warn = warn or (lambda _msg: None)
        try:
            self._create()
        except sqlite3.DatabaseError as exc:
            self._failed(exc)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=60)

    def _create(self) -> None:
        with contextlib.closing(self._connect()) as con, con:
            con.execute(f"CREATE TABLE IF NOT EXISTS {_TABLE} (path TEXT PRIMARY KEY, stamp BLOB, digest BLOB)")

    def _failed(self, exc: sqlite3.DatabaseError) -> None:
        """A memo operation failed: rebuild a corrupted database; otherwise (locked, read-only) go on without."""
        if isinstance(exc, sqlite3.OperationalError):
            self._warn(f"the file-digest memo {self.db_path} cannot be used ({exc}); files are hashed without it")
            return
        self._rebuild(exc)

    def _rebuild(self, exc: Exception) -> None:
        self._warn(f"the file-digest memo {self.db_path} cannot be read ({exc}); rebuilding it (files are hashed "
                   "again once)")
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{self.db_path}{suffix}").unlink()
        self._create()

    @staticmethod
    def _digest_file(path: str) -> bytes:
        try:
            return digest_file(path)
        except OSError:
            return digest_bytes(b"\0unreadable\0" + path.encode())

    def _lookup(self, keys: list[str]) -> dict[str, tuple[bytes, bytes]]:
        known: dict[str, tuple[bytes, bytes]] = {}
        with contextlib.closing(self._connect()) as con:
            for i in range(0, len(keys), 900):
                q = keys[i : i + 900]
                rows = con.execute(f"SELECT path, stamp, digest FROM {_TABLE} WHERE path IN "
                                   f"({','.join('?' * len(q))})", q).fetchall()
                known.update({r[0]: (r[1], r[2]) for r in rows})
        return known

    def _store(self, rows: list[tuple]) -> None:
        with contextlib.closing(self._connect()) as con, con:
            con.executemany(f"INSERT OR REPLACE INTO {_TABLE} VALUES (?, ?, ?)", rows)

    def forget(self, paths: Sequence[Path]) -> None:
        """Drop the memo of ``paths`` (their content was found to differ from the memoised digest)."""
        keys = [str(p) for p in paths]
        try:
            with contextlib.closing(self._connect()) as con, con:
                con.executemany(f"DELETE FROM {_TABLE} WHERE path = ?", [(k,) for k in keys])
        except sqlite3.DatabaseError as exc:
            self._failed(exc)

    def digests(self, paths: Sequence[Path], *, threads: int = 8) -> list[bytes]:
        """The content digest of each file (of a marker for a file that cannot be read)."""
        started = time.time_ns()
        stamps: list[bytes | None] = []
        for p in paths:
            try:
                stamps.append(file_stamp(os.stat(p)))
            except OSError:
                stamps.append(None)
        keys = [str(p) for p in paths]
        try:
            known = self._lookup(keys)
        except sqlite3.DatabaseError as exc:
            self._failed(exc)
            known = {}
        out: list[bytes | None] = [None] * len(keys)
        todo = []
        for i, (k, st) in enumerate(zip(keys, stamps, strict=True)):
            hit = known.get(k)
            if hit is not None and st is not None and hit[0] == st:
                out[i] = bytes(hit[1])
            else:
                todo.append(i)
        if todo:
            # threads overlap the reads of a slow disk or a network filesystem; each task hashes a block of
            # files, since one task per file costs more in the pool than hashing a small file (100,000 files of
            # 2 KB: 12 s one per task, 3.4 s by blocks of 256; benchmarks/hashing.py)
            blocks = [todo[i : i + _TASK] for i in range(0, len(todo), _TASK)]
            with ThreadPoolExecutor(max_workers=threads) as ex:
                for block, ds in zip(blocks, ex.map(lambda b: [self._digest_file(keys[j]) for j in b], blocks),
                                     strict=True):
                    for i, d in zip(block, ds, strict=True):
                        out[i] = d
            racy = started - int(RACY_SECONDS * 1e9)
            rows = []
            for i in todo:
                st = stamps[i]
                if st is None or max(_STAMP.unpack(st)[1:3]) >= racy:
                    continue
                try:
                    if file_stamp(os.stat(keys[i])) != st:  # changed while it was being hashed
                        continue
                except OSError:
                    continue
                rows.append((keys[i], st, out[i]))
            if rows:
                try:
                    self._store(rows)
                except sqlite3.DatabaseError as exc:
                    self._failed(exc)
        return [d for d in out if d is not None]
