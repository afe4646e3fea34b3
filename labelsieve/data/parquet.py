"""Parquet files and Hugging Face ``datasets`` folders: images as bytes in a column, read with pyarrow.

A Parquet file (the Hugging Face hub serves every dataset as Parquet), a folder of them, or a folder written by
``datasets.Dataset.save_to_disk`` (Arrow IPC files ``data-*.arrow`` beside ``state.json`` and
``dataset_info.json``). Each row is a sample:

* its image is the ``image`` column (``--image-column``): Hugging Face's ``Image`` feature, a struct of ``bytes``
  and ``path`` (the bytes are read; a row with only a path has no image here and is reported unreadable), or a
  plain binary column of encoded image bytes;
* its label is the ``label`` column (``--label-column``): text, or an integer; for a ``ClassLabel`` feature the
  class names come from the Hugging Face features metadata (the ``huggingface`` key of the schema metadata, or the
  folder's ``dataset_info.json``), so the audit shows ``tench``, not ``0``.

Parquet is read a row group at a time (``ParquetFile.read_row_group``, only the columns needed), never the whole
file; an Arrow file is memory-mapped and read a record batch at a time. ``datasets`` itself is not needed: its
Parquet and Arrow files are read by pyarrow, which it uses underneath, and its features metadata is JSON.
:func:`write_table_copy` streams a cleaned copy, a row group at a time.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from labelsieve.core.errors import DataError
from labelsieve.core.paths import open_regular
from labelsieve.data.hashing import DIGEST_SIZE, digest_bytes
from labelsieve.data.indexmemo import pack_strings

__all__ = ["TableReader", "columns_of", "index_table", "is_arrow", "write_table_copy"]

_ARROW_MAGIC = b"ARROW1"
#: Row groups (or record batches) a reader keeps decoded, per file.
_CACHED_GROUPS = 4


def is_arrow(path: Path) -> bool:
    """Whether ``path`` is an Arrow IPC file (``.arrow``; a Hugging Face ``save_to_disk`` shard)."""
    return path.suffix.lower() == ".arrow"


class _Table:
    """One Parquet or Arrow file: its schema and row groups (record batches for Arrow), read one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open_regular(path):  # refuses a FIFO or device before pyarrow opens it
            pass
        if is_arrow(path):
            source = pa.memory_map(str(path), "r")
            head = source.read(6)
            source.seek(0)
            reader = pa.ipc.open_file(source) if head == _ARROW_MAGIC else pa.ipc.open_stream(source)
            self._batches: list[pa.RecordBatch] | None = (
                [reader.get_batch(i) for i in range(reader.num_record_batches)] if head == _ARROW_MAGIC
                else list(reader))  # memory-mapped: the batches are views of the file, nothing is copied
            self.schema = reader.schema
            sizes = [b.num_rows for b in self._batches]
            self._pf = None
        else:
            self._pf = pq.ParquetFile(str(path), memory_map=False)
            self._batches = None
            self.schema = self._pf.schema_arrow
            meta = self._pf.metadata
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_rows = int(self.starts[-1])

    @property
    def n_groups(self) -> int:
        return len(self.starts) - 1

    def group(self, g: int, columns: Sequence[str]) -> pa.Table:
        """Row group (record batch) ``g`` with ``columns`` only."""
        if self._batches is not None:
            return pa.Table.from_batches([self._batches[g].select(list(columns))])
        assert self._pf is not None
        return self._pf.read_row_group(g, columns=list(columns))

    def metadata(self) -> dict[bytes, bytes]:
        return dict(self.schema.metadata or {})


def _hf_features(table: _Table) -> dict[str, Any]:
    """The Hugging Face features of a file (its schema metadata, else the folder's ``dataset_info.json``)."""
    raw = table.metadata().get(b"huggingface")
    if raw:
        try:
            info = json.loads(raw)
            feats = (info.get("info") or {}).get("features")
            if isinstance(feats, dict):
                return feats
        except (ValueError, AttributeError):
            pass
    info_file = table.path.parent / "dataset_info.json"
    if info_file.is_file():
        try:
            feats = json.loads(info_file.read_text(encoding="utf-8")).get("features")
            if isinstance(feats, dict):
                return feats
        except (OSError, ValueError):
            pass
    return {}


def columns_of(path: Path, *, name: str, image_column: str, label_column: str | None) -> dict[str, Any]:
    """Check a file's columns and describe them: ``{"image": name, "label": name or None, "classes": [...] or
    None}`` (``classes``: a ``ClassLabel``'s names, from the Hugging Face features).

    Raises
    ------
    DataError
        No such image column (naming the file and its columns), an image column that holds no bytes, no label
        column when one is needed.
    """
    try:
        table = _Table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{name}: not a readable {'Arrow' if is_arrow(path) else 'Parquet'} file ({exc}).") from None
    schema = table.schema
    names = schema.names
    shown = ", ".join(names[:20]) + (" …" if len(names) > 20 else "")
    if image_column not in names:
        raise DataError(f"{name}: no image column {image_column!r} (its columns: {shown}). Name the column that holds "
                        "the images with --image-column.")
    kind = schema.field(image_column).type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
            or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
        raise DataError(f"{name}: column {image_column!r} holds {kind}, not image bytes (a binary column, or a struct "
                        "with a 'bytes' field as Hugging Face writes images). Name the image column with "
                        "--image-column.")
    classes = None
    if label_column is not None:
        if label_column not in names:
            raise DataError(f"{name}: no label column {label_column!r} (its columns: {shown}). Name the column that "
                            "holds the labels with --label-column, or give a labels CSV.")
        feat = _hf_features(table).get(label_column)
        if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" and feat.get("names"):
            classes = [str(c) for c in feat["names"]]
        ltype = schema.field(label_column).type
        if not (pa.types.is_integer(ltype) or pa.types.is_string(ltype) or pa.types.is_large_string(ltype)
                or pa.types.is_dictionary(ltype)):
            raise DataError(f"{name}: label column {label_column!r} holds {ltype}; labels must be text or class "
                            "numbers.")
    return {"image": image_column, "label": label_column, "classes": classes, "rows": table.num_rows}


def _image_bytes(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The encoded bytes of an image column (a struct's ``bytes`` field, or the binary column itself)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_struct(arr.type):
        arr = pc.struct_field(arr, [arr.type.get_field_index("bytes")])
    return arr


def _image_paths(column: pa.ChunkedArray | pa.Array) -> list[str | None] | None:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_struct(arr.type) and arr.type.get_field_index("path") >= 0:
        return pc.struct_field(arr, [arr.type.get_field_index("path")]).to_pylist()
    return None


def _label_texts(column: pa.ChunkedArray, classes: list[str] | None, *, name: str, start: int) -> list[str]:
    """Labels as text ('' for a missing one); class numbers become their ``ClassLabel`` names."""
    values = column.to_pylist()
    out: list[str] = []
    for k, v in enumerate(values):
        if v is None:
            out.append("")
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            if classes is not None:
                if not 0 <= v < len(classes):
                    raise DataError(f"{name}#{start + k}: label {v} is not a class number of the ClassLabel names "
                                    f"({len(classes)} classes) in the file's Hugging Face features.")
                out.append(classes[v])
            else:
                out.append(str(v))
        else:
            out.append(str(v).strip())
    return out


def index_table(path: Path, *, name: str, image_column: str, label_column: str | None) -> dict[str, np.ndarray]:
    """Read a Parquet or Arrow file once, a row group (record batch) at a time: the content digest of each row's
    image and its label.

    Returns
    -------
    dict of ndarray
        ``n``, ``digest`` (``S16``; the digest of ``b""`` where a row has no image bytes), ``missing`` (bool: no
        image bytes), ``group`` (int32: each row's row group, or record batch), ``labels`` (packed label texts,
        '' where missing), ``classes`` (packed ``ClassLabel`` names,
        possibly empty), ``n_classes``.
    """
    cols = columns_of(path, name=name, image_column=image_column, label_column=label_column)
    table = _Table(path)
    digests: list[bytes] = []
    missing: list[bool] = []
    labels: list[str] = []
    groups: list[np.ndarray] = []
    wanted = [image_column] + ([label_column] if label_column is not None else [])
    empty = digest_bytes(b"")
    for g in range(table.n_groups):
        part = table.group(g, wanted)
        data = _image_bytes(part.column(image_column))
        for v in data.to_pylist():
            digests.append(digest_bytes(v) if v else empty)
            missing.append(v is None)
        groups.append(np.full(len(data), g, dtype=np.int32))
        if label_column is not None:
            labels.extend(_label_texts(part.column(label_column), cols["classes"], name=name,
                                       start=int(table.starts[g])))
        del part, data
    classes = cols["classes"] or []
    return {
        "n": np.array(table.num_rows, dtype=np.int64),
        "digest": np.array(digests, dtype=f"S{DIGEST_SIZE}"),
        "missing": np.array(missing, dtype=bool),
        "group": np.concatenate(groups) if groups else np.zeros(0, dtype=np.int32),
        "labels": pack_strings(labels if label_column is not None else [""] * table.num_rows),
        "classes": pack_strings(classes),
        "n_classes": np.array(len(classes), dtype=np.int64),
    }


class TableReader:
    """Random and sequential reads of image bytes from Parquet/Arrow files, a row group at a time.

    Keeps the last few decoded row groups of each file (thread-safe), so reading rows in order reads each row
    group once. Pickles without its caches (each DataLoader worker opens the files itself).
    """

    def __init__(self, image_column: str) -> None:
        self.image_column = image_column
        self._tables: dict[str, _Table] = {}
        self._groups: OrderedDict[tuple[str, int], tuple[pa.Array, list[str | None] | None]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"image_column": self.image_column}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["image_column"])  # type: ignore[misc]

    def _table(self, path: str) -> _Table:
        t = self._tables.get(path)
        if t is None:
            t = self._tables[path] = _Table(Path(path))
        return t

    def _group(self, path: str, g: int) -> tuple[pa.Array, list[str | None] | None]:
        with self._lock:
            hit = self._groups.get((path, g))
            if hit is not None:
                self._groups.move_to_end((path, g))
                return hit
            col = self._table(path).group(g, [self.image_column]).column(self.image_column)
            hit = (_image_bytes(col), _image_paths(col))
            self._groups[(path, g)] = hit
            while len(self._groups) > _CACHED_GROUPS:
                self._groups.popitem(last=False)
            return hit

    def read(self, path: str, row: int) -> bytes:
        """The image bytes of ``row`` (0-based) of the file ``path``; OSError when the row has none."""
        table = self._table(path)
        if not 0 <= row < table.num_rows:
            raise OSError(f"row {row} is not in the file ({table.num_rows} rows): it changed since it was indexed")
        g = int(np.searchsorted(table.starts, row, side="right") - 1)
        data, paths = self._group(path, g)
        value = data[row - int(table.starts[g])].as_py()
        if value is None:
            where = paths[row - int(table.starts[g])] if paths is not None else None
            raise OSError("the row has no image bytes" + (f" (only a path, {where!r}, which is not read)" if where
                                                          else ""))
        return value

    def read_rows(self, path: str, rows: np.ndarray) -> Iterator[tuple[int, bytes | None, str]]:
        """``(row, bytes, "")`` for each of ``rows`` (sorted), or ``(row, None, why)``; each row group read once."""
        for row in rows:
            try:
                yield int(row), self.read(path, int(row)), ""
            except (OSError, pa.ArrowException) as exc:
                yield int(row), None, str(exc) or type(exc).__name__


def write_table_copy(src: Path, dest: Path, *, keep: np.ndarray, labels: dict[int, str], label_column: str | None,
                     classes: list[str] | None) -> int:
    """Stream ``src`` into the Parquet file ``dest`` a row group at a time: the rows ``keep`` (a sorted array of
    row numbers), with the label of each row in ``labels`` (row -> label text) written into ``label_column``
    (as its class number when the column holds ``ClassLabel`` numbers, else as text; None: labels left as they
    are). Every column and the schema's metadata (the Hugging Face features) are kept. Returns the number of rows
    written."""
    table = _Table(src)
    schema = table.schema
    ltype = schema.field(label_column).type if label_column is not None else None
    index = {c: i for i, c in enumerate(classes)} if classes is not None else None
    written = 0
    with pq.ParquetWriter(str(dest), schema) as out:
        for g in range(table.n_groups):
            lo, hi = int(table.starts[g]), int(table.starts[g + 1])
            take = keep[(keep >= lo) & (keep < hi)]
            if len(take) == 0:
                continue
            part = table.group(g, schema.names).take(pa.array(take - lo))
            if label_column is not None and ltype is not None:
                new = [labels[int(r)] for r in take]
                if pa.types.is_integer(ltype):
                    values = pa.array([index[v] if index is not None else int(v) for v in new], type=ltype)
                else:
                    values = pa.array(new, type=pa.string()).cast(ltype)
                part = part.set_column(schema.get_field_index(label_column), schema.field(label_column), values)
            out.write_table(part.replace_schema_metadata(schema.metadata))
            written += len(take)
    return written
