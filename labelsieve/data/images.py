"""The labelled image collection every later stage reads: :class:`LabeledImages`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from labelsieve.data.members import Member, Members


@dataclass
class LabeledImages:
    """Images with their given labels.

    Attributes
    ----------
    root : Path
        Folder the paths are relative to.
    paths : list of str
        Paths as given in the input (relative to ``root``), one per row, in input order.
    labels : ndarray of shape (n,), int64
        Given labels as indices into ``classes``.
    classes : list of str
        Raw label values (as in the CSV or folder names), sorted; index = class id.
    classnames : list of str
        The text a vision-language model reads for each class (``classes`` unless a
        ``--classnames`` file maps them).
    source : str
        Where the labels came from (the CSV path, or the root for an ImageFolder tree).
    rows : ndarray of shape (n,), int64
        Row number of each sample in the source, for messages (1-based CSV line, header = line 1).
    members : Members, optional
        For images stored inside containers (WebDataset shards, Parquet/Arrow files): where each row's bytes lie
        (:mod:`labelsieve.data.members`); ``paths`` then hold sample names such as ``shard-000003.tar/KEY.jpg`` or
        ``train-00001.parquet#1234``. None for image files.
    label_merges : dict
        Spellings merged into another by ``normalize_labels`` (:func:`labelsieve.data.load_images`): raw -> class.
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    classnames: list[str]
    source: str
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    members: Members | None = None
    label_merges: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.rows) != len(self.paths):
            self.rows = np.arange(len(self.paths), dtype=np.int64)
        if self.members is not None and len(self.members) != len(self.paths):
            raise ValueError(f"{len(self.members)} container members for {len(self.paths)} paths")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def kind(self) -> str:
        """``"files"``, or the container kind (``"webdataset"``, ``"parquet"``, ``"arrow"``)."""
        return self.members.kind if self.members is not None else "files"

    def abspath(self, i: int) -> Path:
        """The file of row ``i`` (images stored as files only; see :meth:`locate`)."""
        if self.members is not None:
            raise TypeError(f"{self.paths[i]} is inside a {self.members.kind} container, not a file: use locate()")
        return self.root / self.paths[i]

    def locate(self, i: int) -> Path | Member:
        """Where row ``i``'s image is: its file, or a :class:`~labelsieve.data.members.Member` of a container
        (both have ``read_bytes()``)."""
        if self.members is not None:
            return self.members.locate(i, self.paths[i])
        return self.root / self.paths[i]

    def digests(self) -> np.ndarray | None:
        """The content digests a container index recorded (None for files: they are hashed when read)."""
        return self.members.digests if self.members is not None else None

    def subset(self, index: Sequence[int] | np.ndarray) -> LabeledImages:
        """The rows ``index`` (class list unchanged)."""
        idx = np.asarray(index, dtype=np.int64)
        return LabeledImages(
            root=self.root,
            paths=[self.paths[i] for i in idx],
            labels=self.labels[idx],
            classes=list(self.classes),
            classnames=list(self.classnames),
            source=self.source,
            rows=self.rows[idx],
            members=self.members.subset(idx) if self.members is not None else None,
            label_merges=dict(self.label_merges),
        )

    @staticmethod
    def concat(parts: Sequence[LabeledImages], *, source: str | None = None) -> LabeledImages:
        """The rows of ``parts`` one after the other (one class list; one kind of storage)."""
        first = parts[0]
        kinds = {p.kind for p in parts}
        if len(kinds) > 1:
            raise ValueError(f"cannot join images stored as {sorted(kinds)}")
        members = Members.concat([p.members for p in parts if p.members is not None]) if first.members else None
        roots = {p.root for p in parts}
        if members is None and len(roots) > 1:  # files under different roots: absolute paths
            paths = [str(p.root / q) for p in parts for q in p.paths]
            root = Path("/")
        else:
            paths = [q for p in parts for q in p.paths]
            root = first.root
        return LabeledImages(root=root, paths=paths, labels=np.concatenate([p.labels for p in parts]),
                             classes=list(first.classes), classnames=list(first.classnames),
                             source=source or first.source, rows=np.concatenate([p.rows for p in parts]),
                             members=members)

    def label_names(self, labels: np.ndarray | None = None) -> list[str]:
        """Raw label strings of ``labels`` (default: the given labels)."""
        lab = self.labels if labels is None else labels
        return [self.classes[int(i)] for i in lab]

    def content_hash(self) -> str:
        """A hash of the paths and labels (the audit's ``input_hash``; file contents are hashed by the
        feature store): :func:`input_hash`."""
        return input_hash(self.paths, self.label_names())


def input_hash(paths: Sequence[str], labels: Sequence[str]) -> str:
    """A hash of rows of paths and labels, in order (an audit's ``input_hash``). Paths are hashed byte for byte
    (a name that is not valid UTF-8 by its original bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for p, y in zip(paths, labels, strict=True):
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
        h.update(y.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()

