"""The audit table's format: its columns, and the one reader of an ``audit.csv`` (as labelsieve wrote it,
or as a spreadsheet saved it back) that ``apply``, ``train --clean`` and ``evaluate`` all use, with the
record (``audit.json``) written beside it."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labelsieve.core.errors import DataError
from labelsieve.core.io import is_spreadsheet_error, restore_frame, sniff_delimiter
from labelsieve.core.paths import listed

__all__ = ["AUDIT_ID_COLUMN", "COLUMNS", "DIGEST_COLUMN", "REVIEW_OPTIONAL", "REVIEW_REQUIRED", "audit_record",
           "count_reviews", "flagged_mask", "line_word", "paths_hash", "read_audit"]

#: The audit's columns, in order (DESIGN.md §1); detectors may add their own after them.
COLUMNS = ["path", "given_label", "p_clean", "is_noisy", "suggested_label", "suggested_prob", "issue", "rank",
           "review", "check"]
#: The audit's identity, on every row of audit.csv / audit.xlsx and of a reviews CSV (labelsieve.audit.auditset).
AUDIT_ID_COLUMN = "audit_id"
#: An image's content digest (``b2-`` + 16 hex digits) as the audit read it: a decision made on a row is checked
#: to be about the same picture wherever it is applied.
DIGEST_COLUMN = "digest"
#: Columns the review rule needs, and those it reads when present.
REVIEW_REQUIRED = ("path", "given_label", "is_noisy")
REVIEW_OPTIONAL = ("suggested_label", "issue", "review", "index", "row")
_TRUE = frozenset({"true", "1", "yes", "y", "t", "1.0"})
_FALSE = frozenset({"false", "0", "no", "n", "f", "0.0", ""})
_TRUE_SPELLINGS = [True, *_TRUE, *(v.upper() for v in _TRUE), *(v.title() for v in _TRUE)]
_FALSE_SPELLINGS = [False, *_FALSE, *(v.upper() for v in _FALSE), *(v.title() for v in _FALSE)]
_MAX_LISTED = 5
#: File suffixes read as Excel workbooks.
XLSX_SUFFIXES = (".xlsx", ".xlsm")


def read_audit(audit_csv: str | os.PathLike[str], *, required: Sequence[str] = REVIEW_REQUIRED,
               optional: Sequence[str] = REVIEW_OPTIONAL) -> pd.DataFrame:
    """Read an audit CSV, as written by labelsieve and possibly edited in a spreadsheet.

    Parameters
    ----------
    audit_csv : path
        The audit file. UTF-8 with or without BOM; ``,``, ``;`` or tab separated; or an Excel
        workbook (``.xlsx``, as ``labelsieve audit --xlsx`` writes it: the first sheet is read).
    required, optional : sequence of str
        Columns that must be present, and columns read when present (default: what the review rule
        uses, :data:`REVIEW_REQUIRED` and :data:`REVIEW_OPTIONAL`). Header names match whatever their
        case and surrounding spaces (a spreadsheet that made ``review`` into ``Review`` is read the same).

    Returns
    -------
    DataFrame
        The ``required`` columns and those of ``optional`` that are present, all as strings with empty
        cells as ``""`` (so labels such as ``NA`` stay text), and the leading ``'`` that labelsieve adds
        against formula injection removed (:func:`labelsieve.core.io.restore_cell`). The index is the
        1-based CSV line number of each row (header = line 1), named ``line`` (for a workbook: the sheet's
        row number, named ``row``); blank lines are skipped.

    Raises
    ------
    DataError
        If the file is missing, not UTF-8, empty, lacks a required column, has two columns of the same
        name (``review`` and ``Review``), or holds a spreadsheet error value (``#NAME?``, ``#REF!``,
        ``#VALUE!`` …) in a column it reads (lines named).
    """
    p = Path(audit_csv)
    if not p.is_file():
        raise DataError(f"Audit file not found: {p}. Give the audit.csv written by 'labelsieve audit'.")
    wanted = {c.lower() for c in (*required, *optional)}
    if p.suffix.lower() in XLSX_SUFFIXES:
        return _finish(_read_xlsx(p, wanted), p, required, index_name="row")
    try:
        with open(p, encoding="utf-8-sig") as f:
            sample = f.read(8192)
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc}). Save the reviewed audit as UTF-8 CSV "
                        "and try again.") from exc
    if not sample.strip():
        raise DataError(f"{p}: the file is empty. Give the audit.csv written by 'labelsieve audit'.")
    try:
        df = pd.read_csv(
            p,
            sep=sniff_delimiter(sample),
            encoding="utf-8-sig",
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            usecols=lambda c: str(c).strip().lower() in wanted,
        )
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"{p}: cannot parse the CSV ({exc}). Check the quoting and delimiters.") from exc
    return _finish(df, p, required, index_name="line")


def _read_xlsx(p: Path, wanted: set[str]) -> pd.DataFrame:
    """The first sheet of a workbook, every cell as text (empty cells as NaN, filled by :func:`_finish`)."""
    try:
        return pd.read_excel(p, sheet_name=0, dtype=str, keep_default_na=False, engine="openpyxl",
                             usecols=lambda c: str(c).strip().lower() in wanted)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{p}: cannot read the workbook ({exc}). Save it again as .xlsx from the spreadsheet, "
                        "or as UTF-8 CSV.") from exc


def _finish(df: pd.DataFrame, p: Path, required: Sequence[str], *, index_name: str) -> pd.DataFrame:
    """Normalise the header (case, spaces), check the required columns, index rows by their line (row)
    number, drop blank rows, restore neutralised cells and refuse spreadsheet error values."""
    header = [str(c).strip() for c in df.columns]
    names = [h.lower() for h in header]
    twice = sorted({h for h, n in zip(header, names, strict=True) if names.count(n) > 1})
    if twice:
        raise DataError(f"{p}: the columns {twice} differ only in case or spaces; which one holds the data is "
                        "ambiguous. Delete or rename all but one of them.")
    df.columns = names
    missing = [c for c in required if c.lower() not in df.columns]
    if missing:
        raise DataError(f"{p}: no column {', '.join(repr(m) for m in missing)}. An audit needs the columns "
                        f"{', '.join(required)} (as written by 'labelsieve audit'); check the header row.")
    df = df.fillna("")
    df.index = pd.RangeIndex(2, len(df) + 2, name=index_name)
    blank = np.ones(len(df), dtype=bool)
    for c in df.columns:
        blank &= (df[c].to_numpy(dtype=object) == "")
    if blank.any():
        df = df.loc[~blank]
    restore_frame(df)
    errors: list[str] = []
    for c in df.columns:
        values = df[c].to_numpy(dtype=object)
        cand = np.flatnonzero(np.isin(df[c].str[:1].to_numpy(dtype=object), ["#", "E", "e", " "]))
        errors.extend(f"{index_name} {df.index[i]}, column {c!r}: {values[i]!r}" for i in cand
                      if is_spreadsheet_error(values[i]))
    if errors:
        raise DataError(f"{p}: {len(errors)} cell(s) hold a spreadsheet error instead of a value ({listed(errors)}). "
                        "A formula failed in the spreadsheet that saved this file: type the value (a review "
                        "decision, a label) again, or restore it from the original audit.")
    return df


def count_reviews(audit_csv: str | os.PathLike[str]) -> int | None:
    """How many rows of an existing audit file hold a review decision (a non-empty ``review`` cell).

    Returns 0 for a file without a ``review`` column or without decisions, and None for a file that
    cannot be read as a CSV (which may hold decisions nobody can count: callers treat it as reviewed).
    """
    try:
        with open(audit_csv, "rb") as f:
            if not f.read(4096).strip():
                return 0  # an empty file holds nothing
        table = read_audit(audit_csv, required=(), optional=("review",))
    except (DataError, OSError):
        return None
    if "review" not in table.columns:
        return 0
    return int((table["review"].str.strip() != "").sum())


def paths_hash(paths: Iterable[str]) -> str:
    """A hash of a set of paths, independent of their order (recorded in audit.json, so ``apply`` can tell
    whether the rows of a sheet are the rows the audit wrote)."""
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(set(paths)):
        h.update(p.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def audit_record(audit_csv: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``audit.json`` written beside ``audit_csv`` by the same audit ({} when there is none)."""
    f = Path(audit_csv).with_name("audit.json")
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{f}: cannot read the audit's record ({exc}). Restore it from the audit's output folder, "
                        "or move it away.") from exc
    return data if isinstance(data, dict) else {}


def flagged_mask(table: pd.DataFrame, *, where: str = "audit table") -> np.ndarray:
    """The ``is_noisy`` column as a boolean array, whatever a spreadsheet made of it.

    Parameters
    ----------
    table : DataFrame
        Audit table with an ``is_noisy`` column (bool, 0/1, or text such as ``True``/``FALSE``/``1``;
        an empty cell reads as False).
    where : str, default "audit table"
        Name of the source, for error messages.

    Returns
    -------
    ndarray of shape (n,), bool

    Raises
    ------
    DataError
        If a value is not recognisable as true or false.
    """
    col = table["is_noisy"]
    if pd.api.types.is_bool_dtype(col.dtype):
        return col.fillna(False).to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(col.dtype):
        return col.fillna(0).to_numpy() != 0
    values = col.to_numpy(dtype=object, na_value="")
    # Fast path: exact spellings are matched by hashing; only the rest is trimmed and lower-cased.
    is_true = pd.Series(values, dtype=object).isin(_TRUE_SPELLINGS).to_numpy(copy=True)
    is_false = pd.Series(values, dtype=object).isin(_FALSE_SPELLINGS).to_numpy(copy=True)
    rest = np.flatnonzero(~(is_true | is_false))
    if len(rest):
        norm = [str(v).strip().lower() for v in values[rest]]
        is_true[rest] = [v in _TRUE for v in norm]
        is_false[rest] = [v in _FALSE for v in norm]
    bad = ~(is_true | is_false)
    if bad.any():
        pos = np.flatnonzero(bad)[:_MAX_LISTED]
        shown = "; ".join(f"{line_word(table)} {table.index[i]}: {col.iloc[i]!r}" for i in pos)
        raise DataError(f"{where}: {int(bad.sum())} row(s) have an 'is_noisy' value that is neither true nor "
                        f"false ({shown}). Write True or False.")
    return is_true


def line_word(table: pd.DataFrame) -> str:
    """How error messages name a row of ``table``: "line" (CSV line number) or "row" (sheet row / position)."""
    return "line" if table.index.name == "line" else "row"
