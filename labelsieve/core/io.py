"""File I/O every layer shares: atomic writes, the one JSON sanitiser, CSV delimiter sniffing, and the
cell rules of CSVs people open in a spreadsheet (formula neutralisation, spreadsheet error values).

Every file labelsieve writes — audit.csv/json/html, labels.clean.csv, feature chunks, checkpoints,
exported models — goes through :func:`atomic_path` (or :func:`atomic_open` built on it): the content
goes to a temporary file in the destination folder, which replaces the destination only once it is
complete and flushed to disk, so an interrupted or failing write never leaves a partial file behind
and never damages the file it was replacing.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from labelsieve.core.errors import NO_SPACE, no_space_error
from labelsieve.core.spreadsheet import is_convertible

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FORMULA_PREFIXES", "atomic_open", "atomic_path", "atomic_save_npy", "atomic_write_text",
           "is_spreadsheet_error", "line_end", "neutralise_cell", "neutralise_frame", "restore_cell", "restore_frame",
           "sniff_delimiter",
           "to_jsonable", "write_json"]

#: First characters that make a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_SPREADSHEET_ERRORS = frozenset({
    "#NAME?", "#REF!", "#VALUE!", "#DIV/0!", "#N/A", "#NULL!", "#NUM!", "#SPILL!", "#CALC!", "#GETTING_DATA",
    "#FIELD!", "#BLOCKED!", "#CONNECT!", "#BUSY!", "#UNKNOWN!", "#EXTERNAL!",
})
_LIBREOFFICE_ERROR = re.compile(r"ERR:\d{3}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path that replaces ``path`` when the block completes.

    Parameters
    ----------
    path : path
        Destination file. Its folder is created if missing; an existing file is replaced.

    Yields
    ------
    Path
        ``.<name>.<random>.tmp`` in the destination folder, for writers that need a file name
        (``np.lib.format.open_memmap``, ``safetensors``). The caller writes it completely; it is
        fsynced and renamed over ``path`` when the block exits without an exception, and removed
        (``path`` left as it was) when the block raises. A full disk (``ENOSPC``, ``EDQUOT``) is raised as
        an :class:`~labelsieve.core.errors.OutputError` naming ``path``.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.tmp"
    try:
        yield tmp
        if tmp.exists():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            raise no_space_error(exc, dest) from exc
        raise


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "w", *, encoding: str = "utf-8", newline: str | None = ""
) -> Iterator[IO[Any]]:
    """Open a file for writing that appears at ``path`` only if the block completes.

    Parameters
    ----------
    path : path
        Destination file (see :func:`atomic_path`).
    mode : {"w", "wb"}, default "w"
        Text or binary.
    encoding : str, default "utf-8"
        Text encoding (text mode only).
    newline : str or None, default ""
        Passed to :func:`open` in text mode (``""`` writes line endings untranslated, as the
        :mod:`csv` module wants).

    Yields
    ------
    file object
        A handle on the temporary file; it is closed, fsynced and renamed over ``path`` when the
        block exits normally.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes new files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        # os.open with mode 0o666 honours the umask (tempfile.mkstemp would make the result owner-only).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        if mode == "wb":
            with os.fdopen(fd, "wb") as fb:
                yield fb
        else:
            with os.fdopen(fd, "w", encoding=encoding, newline=newline) as ft:
                yield ft


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_open(path, newline=None) as f:
        f.write(text)
    return Path(path)


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """``np.save`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb") as f:
        np.save(f, array)
    return Path(path)


def to_jsonable(o: Any) -> Any:
    """``o`` with numpy scalars and arrays, paths and tuples turned into JSON types; NaN and ±inf
    become ``None`` so the output is valid JSON (the one sanitiser every JSON writer uses)."""
    if isinstance(o, dict):
        return {str(k): to_jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return to_jsonable(o.tolist())
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    return o


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as indented UTF-8 JSON atomically (through :func:`to_jsonable`); returns the path."""
    return atomic_write_text(path, json.dumps(to_jsonable(data), indent=2, ensure_ascii=False) + "\n")


def sniff_delimiter(sample: str) -> str:
    """The delimiter of a CSV sample: ``,``, ``;`` or tab (spreadsheets in many locales write ``;``)."""
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t").delimiter
    except csv.Error:
        first = sample.splitlines()[0] if sample else ""
        counts = {d: first.count(d) for d in (",", ";", "\t")}
        return max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","


def _needs_quote(rest: str) -> bool:
    """A cell (its leading ``'`` removed) that a spreadsheet would run or convert."""
    return rest[:1] in FORMULA_PREFIXES or is_convertible(rest)


def neutralise_cell(value: str) -> str:
    """``value`` as it is written into a CSV a person may open in a spreadsheet.

    A cell that starts with one of :data:`FORMULA_PREFIXES`, or that a spreadsheet would convert to a number,
    date, time or boolean (:func:`labelsieve.core.spreadsheet.is_convertible`: ``0012``, ``1e5``, ``3/4``,
    ``TRUE`` …), after any number of ``'``, gets one more leading ``'``, which spreadsheets read as "this is
    text": a file or class named ``=HYPERLINK(...)`` is shown, not run, and a class named ``0012`` stays
    ``0012``. :func:`restore_cell` is the exact inverse, and every reader of the CSVs labelsieve writes applies it.
    """
    rest = value.lstrip("'")
    return "'" + value if _needs_quote(rest) else value


def restore_cell(value: str) -> str:
    """The inverse of :func:`neutralise_cell`: one leading ``'`` removed where neutralise_cell added it.

    A file saved back by a spreadsheet that drops the ``'`` reads the same as the file labelsieve wrote.
    """
    rest = value.lstrip("'")
    return value[1:] if len(rest) < len(value) and rest and _needs_quote(rest) else value


def neutralise_frame(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with :func:`neutralise_cell` applied to every text cell (numbers are left alone)."""
    out = table.copy()
    for c in out.columns:
        if out[c].dtype.kind != "O":  # object or string columns (pandas 3 reads text as "str")
            continue
        values = out[c].to_numpy(dtype=object)
        quoted = {}
        for u in {v for v in values if isinstance(v, str)}:
            q = neutralise_cell(u)
            if q != u:
                quoted[u] = q
        if quoted:
            hit = [i for i, v in enumerate(values) if isinstance(v, str) and v in quoted]
            values = values.copy()
            values[hit] = [quoted[values[i]] for i in hit]
            out[c] = values
    return out


def line_end(table: pd.DataFrame) -> str:
    """The line terminator a CSV of ``table`` is written with: ``\n``, or ``\r\n`` when a text cell holds a
    carriage return (Python's csv quotes a field only for the characters of its terminator, so a name with a CR
    is quoted, and read back whole, only then)."""
    for c in table.columns:
        if table[c].dtype.kind == "O" and any(isinstance(v, str) and "\r" in v for v in table[c].to_numpy()):
            return "\r\n"
    return "\n"


def restore_frame(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (text columns, as read with ``dtype=str``) with :func:`restore_cell` applied to every cell,
    in place; returns it."""
    for c in table.columns:
        col = table[c]
        if col.dtype.kind != "O":
            continue
        values = col.to_numpy(dtype=object)
        hit = [i for i, v in enumerate(values) if isinstance(v, str) and v[:1] == "'"]
        if hit:
            values = values.copy()
            values[hit] = [restore_cell(values[i]) for i in hit]
            table[c] = values
    return table


def is_spreadsheet_error(value: str) -> bool:
    """True for a spreadsheet's error value (``#NAME?``, ``#REF!``, ``#VALUE!``, ``Err:502`` …): what a cell
    shows when a formula failed. Such a cell carries no label or decision; readers refuse it."""
    v = value.strip().upper()
    return v[:1] in ("#", "E") and (v in _SPREADSHEET_ERRORS or _LIBREOFFICE_ERROR.fullmatch(v) is not None)
