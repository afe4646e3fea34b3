"""Samples stored inside container files (WebDataset shards, Parquet and Arrow files): where each image's bytes are.

:class:`Members` is row-aligned with a :class:`~labelsieve.data.images.LabeledImages` whose images are not files:
for each row, the container it is in, where in it (a shard's data offset and size, a table's row), and the content
digest its index recorded. It reads one image at random (:meth:`Members.read`, for thumbnails, training and
prediction: one ``pread`` from a shard; a row group, cached, from a table), and many in bulk through
:class:`UnitStream`: each container (a *unit*) is read by one reader, in storage order, the units split between
DataLoader workers and, under torchrun, between ranks (:func:`balance`), so no container is read twice.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from labelsieve.core.paths import open_regular
from labelsieve.data.hashing import DIGEST_SIZE
from labelsieve.data.parquet import TableReader
from labelsieve.data.webdataset import read_member

__all__ = ["KINDS", "Member", "Members", "UnitStream", "balance"]

#: What a container source may be.
KINDS = ("webdataset", "parquet", "arrow")


@dataclass
class Members:
    """Where the image bytes of each row lie (see the module docstring).

    Attributes
    ----------
    kind : {"webdataset", "parquet", "arrow"}
    files : list of str
        The containers' absolute paths (as found: symbolic links are not resolved).
    file : ndarray of shape (n,), int32
        Each row's container, an index into ``files``.
    pos : ndarray of shape (n,), int64
        A shard's data offset, or a table's row number.
    size : ndarray of shape (n,), int64
        The image's size in bytes in a shard (0 for a table).
    group : ndarray of shape (n,), int32
        A table's row group (record batch) holding the row; 0 in a shard. A *unit* of bulk reading is one shard,
        or one row group of a table.
    digests : ndarray of shape (n,), ``S16``
        Content digests of the images (blake2b-128 of their bytes, as for files).
    image_column : str or None
        A table's image column.
    spec : str
        The containers as the command named them (a file, folder or pattern, absolute), to open them again.
    label_column : str or None
        A table's label column, where the labels came from it.
    """

    kind: str
    files: list[str]
    file: np.ndarray
    pos: np.ndarray
    size: np.ndarray
    digests: np.ndarray
    group: np.ndarray | None = None
    image_column: str | None = None
    spec: str = ""
    label_column: str | None = None
    _local: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.file = np.asarray(self.file, dtype=np.int32)
        self.pos = np.asarray(self.pos, dtype=np.int64)
        self.size = np.asarray(self.size, dtype=np.int64)
        self.digests = np.asarray(self.digests, dtype=f"S{DIGEST_SIZE}")
        self.group = (np.zeros(len(self.file), dtype=np.int32) if self.group is None
                      else np.asarray(self.group, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.file)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_local"] = {}  # open files and decoded row groups stay in the process that made them
        return state

    def subset(self, index: Sequence[int] | np.ndarray) -> Members:
        """The rows ``index``."""
        idx = np.asarray(index, dtype=np.int64)
        return Members(kind=self.kind, files=list(self.files), file=self.file[idx], pos=self.pos[idx],
                       size=self.size[idx], digests=self.digests[idx], group=self.group[idx],
                       image_column=self.image_column,
                       spec=self.spec, label_column=self.label_column)

    @staticmethod
    def concat(parts: Sequence[Members]) -> Members:
        """Rows of ``parts`` one after the other (one kind and image column)."""
        first = parts[0]
        if any(p.kind != first.kind or p.image_column != first.image_column for p in parts):
            raise ValueError("cannot join samples of different container kinds")
        files: dict[str, int] = {}
        remapped = []
        for p in parts:
            ids = np.array([files.setdefault(f, len(files)) for f in p.files], dtype=np.int32)
            remapped.append(ids[p.file] if len(p.file) else p.file)
        return Members(kind=first.kind, files=list(files), file=np.concatenate(remapped),
                       pos=np.concatenate([p.pos for p in parts]), size=np.concatenate([p.size for p in parts]),
                       digests=np.concatenate([p.digests for p in parts]),
                       group=np.concatenate([p.group for p in parts]), image_column=first.image_column,
                       spec=first.spec, label_column=first.label_column)

    # -- reading ----------------------------------------------------------------------------------
    def _fd(self, f: int) -> int:
        fds = self._local.setdefault("fds", {})
        fd = fds.get(f)
        if fd is None:
            with self._local.setdefault("lock", threading.Lock()):
                fd = fds.get(f)
                if fd is None:
                    handle = open_regular(self.files[f], buffering=0)
                    fd = fds[f] = os.dup(handle.fileno())
                    handle.close()
        return fd

    def _tables(self) -> TableReader:
        reader = self._local.get("tables")
        if reader is None:
            reader = self._local["tables"] = TableReader(self.image_column or "image")
        return reader

    def read(self, i: int) -> bytes:
        """The image bytes of row ``i`` (OSError when they cannot be read)."""
        f = int(self.file[i])
        if self.kind == "webdataset":
            return read_member(self._fd(f), int(self.pos[i]), int(self.size[i]))
        return self._tables().read(self.files[f], int(self.pos[i]))

    def locate(self, i: int, name: str) -> Member:
        """A handle on row ``i``'s image (its ``read_bytes`` reads it; ``str`` gives ``name``)."""
        return Member(self, i, name)

    def units(self, rows: np.ndarray, tags: np.ndarray | None = None) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``rows`` grouped by unit (a shard, or a table's row group): ``(container, rows in storage order, their
        tags)`` per unit, in storage order (``tags``: what each row is called by the caller, default the row)."""
        rows = np.asarray(rows, dtype=np.int64)
        tags = rows if tags is None else np.asarray(tags, dtype=np.int64)
        if len(rows) == 0:
            return []
        order = np.lexsort((self.pos[rows], self.group[rows], self.file[rows]))
        rows, tags = rows[order], tags[order]
        f, g = self.file[rows], self.group[rows]
        cuts = np.flatnonzero((np.diff(f) != 0) | (np.diff(g) != 0)) + 1
        return [(int(f[a]), rows[a:b], tags[a:b]) for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(rows)],
                                                                   strict=True)]

    def read_unit(self, f: int, rows: np.ndarray) -> Iterator[tuple[int, bytes | None, str]]:
        """``(row, bytes, "")`` for each of ``rows`` (one container, storage order), or ``(row, None, why)``."""
        if self.kind == "webdataset":
            try:
                fd = self._fd(f)
            except OSError as exc:
                for r in rows:
                    yield int(r), None, f"cannot read {self.files[f]}: {exc}"
                return
            for r in rows:
                try:
                    yield int(r), read_member(fd, int(self.pos[r]), int(self.size[r])), ""
                except OSError as exc:
                    yield int(r), None, str(exc)
            return
        by_pos = {int(self.pos[r]): int(r) for r in rows}
        for pos, data, err in self._tables().read_rows(self.files[f], self.pos[rows]):
            yield by_pos[pos], data, err

    def close(self) -> None:
        """Close the files this process opened (they are also closed when the object is collected)."""
        for fd in self._local.pop("fds", {}).values():
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown
            self.close()


class Member:
    """One image inside a container: ``read_bytes()`` reads it, ``str()`` is its sample name."""

    __slots__ = ("members", "i", "name")

    def __init__(self, members: Members, i: int, name: str) -> None:
        self.members, self.i, self.name = members, i, name

    def read_bytes(self) -> bytes:
        return self.members.read(self.i)

    def __str__(self) -> str:
        return self.name


def balance(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Split units of ``sizes`` into ``parts`` lists of unit numbers with sums as even as a greedy pass makes them
    (largest first, each to the lightest part; deterministic). A unit is never split, so no container is read by
    two parts."""
    load = [0] * max(parts, 1)
    out: list[list[int]] = [[] for _ in range(max(parts, 1))]
    for u in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        p = min(range(len(load)), key=lambda k: (load[k], k))
        out[p].append(u)
        load[p] += sizes[u]
    return [sorted(o) for o in out]


class UnitStream(torch.utils.data.IterableDataset):
    """Items ``fn(tag, bytes or None, error)`` for every row of ``units`` (:meth:`Members.units`), each unit read
    sequentially by one DataLoader worker (:func:`balance` splits them)."""

    def __init__(self, members: Members, units: list[tuple[int, np.ndarray, np.ndarray]],
                 fn: Callable[[int, bytes | None, str], Any]) -> None:
        self.members, self.units, self.fn = members, units, fn

    def __len__(self) -> int:
        return sum(len(r) for _, r, _ in self.units)

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        if info is not None:  # a worker process opens its own files (not the forked parent's handles)
            self.members._local = {}
        mine = (balance([len(r) for _, r, _ in self.units], info.num_workers)[info.id] if info is not None
                else range(len(self.units)))
        for u in mine:
            f, rows, tags = self.units[u]
            tag_of = dict(zip(rows.tolist(), tags.tolist(), strict=True))
            for row, data, err in self.members.read_unit(f, rows):
                yield self.fn(tag_of[row], data, err)
