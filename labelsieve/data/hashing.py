"""Content digests of image files, memoised so a rerun does not re-read every file."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DIGEST_SIZE = 16


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
