"""The labelled image collection every later stage reads: :class:`LabeledImages`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


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
    label_merges: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.rows) != len(self.paths):
            self.rows = np.arange(len(self.paths), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def abspath(self, i: int) -> Path:
        return self.root / self.paths[i]

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
            label_merges=dict(self.label_merges),
        )

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

