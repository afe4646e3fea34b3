"""An audit's files as one unit: its identity, their replacement together, and the one way to open an audit.

**Identity.** Every audit gets an ``audit_id`` (``au-`` and 12 hex digits, derived from its input hash, its
creation time and a random nonce). ``audit.json`` records it with ``created`` and ``input.input_hash``;
``audit.csv`` and ``audit.xlsx`` carry it in an ``audit_id`` column on every row (a row pasted in from
another audit carries that audit's id); ``audit.html`` embeds it, and its reviews CSV carries it.

**Replacement.** :func:`write_audit_set` writes ``audit.csv``, ``audit.xlsx``, ``audit.html`` and
``audit.json`` through :func:`labelsieve.core.fileset.replace_files`: all of them are written under
temporary names first, then committed by a journal and renamed; a file of an older audit that this one does
not write (``audit.html`` with ``--no-html``, ``audit.xlsx`` without ``--xlsx``) is removed, after a copy
when it holds review decisions. An interruption anywhere leaves the previous audit or this one, whole.

**Reading.** :func:`open_audit` is what every reader of a sheet calls (``apply``, ``train --clean``,
``export``, ``evaluate``): it finishes an interrupted replacement, reads the sheet
(:func:`labelsieve.audit.schema.read_audit`) and the ``audit.json`` beside it, and refuses a sheet whose
rows carry another audit's identity than that record. It then checks the labels a spreadsheet may have
changed (:func:`check_labels`): every ``given_label`` and ``suggested_label`` must be one of the audit's
classes; a value that is not, but that exactly one class explains as a typical spreadsheet change
(:func:`labelsieve.core.spreadsheet.mangling`: ``12`` for ``0012``, ``1.00E+05`` for ``1e5``, ``03/04/26`` for
``3/4``, trimmed or case-changed text), is read as that class with a warning naming the rows; any other is
refused, naming the rows. When the sheet has the audit's rows, the labels of all rows are also checked
against the audit's ``labels_hash``, which catches a label changed into *another* class.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labelsieve.audit.html import write_html
from labelsieve.audit.schema import (
    AUDIT_ID_COLUMN,
    DIGEST_COLUMN,
    REVIEW_OPTIONAL,
    REVIEW_REQUIRED,
    audit_record,
    count_reviews,
    line_word,
    paths_hash,
    read_audit,
)
from labelsieve.audit.table import Audit
from labelsieve.audit.writers import write_csv, write_json, write_xlsx
from labelsieve.core.errors import DataError, OutputError
from labelsieve.core.fileset import recover, replace_files
from labelsieve.core.io import atomic_open
from labelsieve.core.paths import check_output_dir, listed
from labelsieve.core.progress import warn
from labelsieve.core.spreadsheet import unmangle
from labelsieve.data.containers import all_samples
from labelsieve.data.images import input_hash
from labelsieve.data.sources import read_image_folder, read_labels_csv

__all__ = ["AUDIT_FILES", "AUDIT_TAG", "check_audit_output", "check_identity", "check_labels", "describe_audit",
           "format_digest", "keep_reviewed_copy", "labels_hash", "new_audit_id", "open_audit", "recorded_input",
           "repair_paths", "write_audit_set"]

#: The files of one audit, replaced together.
AUDIT_FILES = ("audit.csv", "audit.xlsx", "audit.html", "audit.json")
#: The name of the set (its journal is ``.audit.replace.json``).
AUDIT_TAG = "audit"
#: The sheets of the set: they may hold a reviewer's decisions.
_SHEETS = ("audit.csv", "audit.xlsx")


def new_audit_id(input_hash: str, created: str) -> str:
    """A new audit's identity: ``au-`` and 12 hex digits of its input hash, creation time and a nonce (two audits
    of one input in the same second differ). Never read as a number or a date by a spreadsheet."""
    h = hashlib.blake2b(f"{input_hash}|{created}|{secrets.token_hex(8)}".encode(), digest_size=6)
    return "au-" + h.hexdigest()


def format_digest(digest: bytes) -> str:
    """An image's content digest as the audit writes it: ``b2-`` and the first 16 hex digits of its blake2b
    digest (text a spreadsheet keeps as it is)."""
    return "b2-" + bytes(digest[:8]).hex()


def labels_hash(table: pd.DataFrame) -> str:
    """A hash of the set of the rows' (``path``, ``given_label``, ``suggested_label``), whatever their order or
    repeats (recorded in audit.json: a sheet whose labels were changed does not match it)."""
    def col(name: str) -> list[str]:
        if name not in table.columns:
            return [""] * len(table)
        return ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                for v in table[name].to_numpy(dtype=object)]

    rows = sorted(set(zip(col("path"), col("given_label"), col("suggested_label"), strict=True)))
    h = hashlib.blake2b(digest_size=16)
    for r in rows:
        h.update("\x00".join(r).encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def describe_audit(record: dict[str, Any]) -> str:
    """``audit au-… (created …)`` for messages."""
    rid = record.get("audit_id") or "without an identity"
    created = record.get("created")
    return f"audit {rid}" + (f" (created {created})" if created else "")


# --------------------------------------------------------------------------- protecting decisions
def keep_reviewed_copy(audit_csv: str | os.PathLike[str]) -> Path | None:
    """Before an ``audit.csv`` holding review decisions is replaced: copy it to
    ``audit.reviewed-<YYYYmmdd-HHMMSS>.csv`` beside it, say so, and return the copy (None when the file
    does not exist or holds no decision)."""
    src = Path(audit_csv)
    if not src.is_file() or count_reviews(src) == 0:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = src.with_name(f"{src.stem}.reviewed-{stamp}{src.suffix}")
    k = 1
    while dest.exists():
        k += 1
        dest = src.with_name(f"{src.stem}.reviewed-{stamp}-{k}{src.suffix}")
    with atomic_open(dest, "wb") as f, open(src, "rb") as g:
        shutil.copyfileobj(g, f)
    warn(f"{src} held review decisions; it was copied to {dest} before being replaced")
    return dest


def check_audit_output(out_dir: str | os.PathLike[str], *, force: bool, files: Sequence[str] = _SHEETS) -> Path:
    """Before an audit starts: its folder must be writable, and a sheet there that the audit replaces or removes
    (``audit.csv`` and ``audit.xlsx``: a new audit writes the one and removes the other unless ``--xlsx``) that
    holds review decisions is replaced only with ``force`` (a copy is kept then, :func:`keep_reviewed_copy`).
    An interrupted replacement of the folder's audit is finished first."""
    out = check_output_dir(out_dir, what="the audit folder (-o)")
    if out.is_dir():
        recover(out, AUDIT_TAG)
    for name in files:
        target = out / name
        if target.is_file() and not force:
            n = count_reviews(target)
            if n != 0:
                what = f"{n} review decision(s)" if n else "content labelsieve cannot read (it may hold decisions)"
                suffix = Path(name).suffix
                raise OutputError(f"{target} holds {what}; auditing into {out} would replace it. Give another "
                                  "folder with -o, or pass --force (force=True) to replace it: a copy is kept as "
                                  f"audit.reviewed-<date>-<time>{suffix} beside it.")
    return out


# --------------------------------------------------------------------------- writing
def write_audit_set(result: Audit, out_dir: str | os.PathLike[str], *, image_root: str | os.PathLike[str],
                    html: bool = True, xlsx: bool = False, t0: float | None = None,
                    locate: Callable[[str], Any] | None = None) -> dict[str, Path]:
    """Write an audit's files into ``out_dir`` as one unit (see the module docstring).

    ``result.summary`` must hold ``audit_id`` and ``created``; ``labels_hash`` is added to it. The sheets get an
    ``audit_id`` column. A sheet holding review decisions that is replaced or removed is copied first
    (:func:`keep_reviewed_copy`). Returns name -> path of the files written. ``locate`` finds the images of rows
    that are not files under ``image_root`` (container members) for the page's thumbnails.
    """
    out = Path(out_dir)
    summary = result.summary
    audit_id = str(summary["audit_id"])
    table = result.table.assign(**{AUDIT_ID_COLUMN: audit_id})
    summary["labels_hash"] = labels_hash(table)
    t = time.perf_counter()
    for name in _SHEETS:
        keep_reviewed_copy(out / name)  # reviews typed while this audit ran, or replaced with force

    def json_writer(path: Path) -> Path:
        timings = summary.setdefault("timings", {})
        timings["write"] = time.perf_counter() - t
        if t0 is not None:
            timings["total"] = time.perf_counter() - t0
        return write_json(summary, path)

    writers: dict[str, Any] = {"audit.csv": lambda p: write_csv(table, p)}
    if xlsx:
        writers["audit.xlsx"] = lambda p: write_xlsx(table, p)
    if html:
        writers["audit.html"] = lambda p: write_html(table, summary, image_root=Path(image_root), out_path=p,
                                                     locate=locate)
    writers["audit.json"] = json_writer
    return replace_files(out, writers, tag=AUDIT_TAG, members=AUDIT_FILES,
                         record={"audit_id": audit_id, "created": summary.get("created")})


# --------------------------------------------------------------------------- reading
def recorded_input(record: dict[str, Any]) -> tuple[list[str], list[str] | None] | None:
    """The audit's input rows, re-read from the labels CSV or image folder its record names: ``(paths, labels)``
    when they still hash to the audit's ``input_hash``, ``(paths, None)`` when only the set of paths still matches
    (``paths_hash``), None when the input is gone or changed."""
    inp = record.get("input") or {}
    if not inp.get("paths_hash"):
        return None
    try:
        labels_file, root = Path(str(inp.get("labels", ""))), Path(str(inp.get("root", "")))
        if inp.get("kind", "files") != "files" and str(inp.get("labels")) == str(inp.get("containers")):
            found = all_samples(str(inp["containers"]), image_column=inp.get("image_column") or "image",
                                label_column=inp.get("label_column"))[1]  # shards or Parquet: their memoised index
            paths, labels = found.paths, found.labels
        elif labels_file.is_file():
            paths, labels, _ = read_labels_csv(labels_file)
        elif root.is_dir() and labels_file == root:
            paths, labels, _ = read_image_folder(root)
        else:
            return None
    except DataError:
        return None
    if inp.get("input_hash") and input_hash(paths, labels) == inp["input_hash"]:
        return paths, labels
    return (paths, None) if paths_hash(paths) == inp["paths_hash"] else None


def open_audit(audit_csv: str | os.PathLike[str], *, required: Sequence[str] = REVIEW_REQUIRED,
               optional: Sequence[str] = REVIEW_OPTIONAL, labels: bool = True) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a sheet and its record as one audit: the reader ``apply``, ``train --clean``, ``export`` and
    ``evaluate`` share.

    Parameters
    ----------
    audit_csv : path
        ``audit.csv`` or ``audit.xlsx`` (or a copy of one; its record is the ``audit.json`` beside it).
    required, optional : sequence of str
        As :func:`labelsieve.audit.schema.read_audit`; ``audit_id`` and ``digest`` (and, to check them,
        ``given_label`` and ``suggested_label``) are read when present.
    labels : bool, default True
        Check the labels against the audit's classes (:func:`check_labels`; repaired labels are written into
        the returned table).

    Returns
    -------
    table : DataFrame
    record : dict
        The ``audit.json`` beside the sheet ({} when there is none).

    Raises
    ------
    DataError
        As :func:`~labelsieve.audit.schema.read_audit`; rows of another audit than the record's
        (:func:`check_identity`); labels that are no class of the audit (:func:`check_labels`).
    OutputError
        An interrupted replacement of the audit's files that cannot be finished.
    """
    p = Path(audit_csv)
    if p.parent.is_dir():
        recover(p.parent, AUDIT_TAG)
    checked = ("given_label", "suggested_label") if labels else ()
    table = read_audit(p, required=required, optional=(*optional, *checked, AUDIT_ID_COLUMN, DIGEST_COLUMN))
    record = audit_record(p)
    check_identity(table, record, where=str(p))
    table = repair_paths(table, record, where=str(p))
    if labels:
        table = check_labels(table, record, where=str(p))
    return table, record


def repair_paths(table: pd.DataFrame, record: dict[str, Any], *, where: str) -> pd.DataFrame:
    """The sheet with paths a spreadsheet changed (``007`` read as ``7``, trimmed spaces …) read as the audit's
    paths they were, with a warning naming the rows: only where the audit's input can still be read and exactly
    one of the paths missing from the sheet explains the changed one
    (:func:`~labelsieve.core.spreadsheet.mangling`). Other differences are left to apply's row check
    (:func:`labelsieve.audit.review.sheet_vs_record`)."""
    inp = record.get("input") or {}
    if "path" not in table.columns or not inp.get("paths_hash"):
        return table
    paths = table["path"].astype(str).to_numpy(dtype=object)
    if paths_hash(paths.tolist()) == inp["paths_hash"]:
        return table
    original = recorded_input(record)
    if original is None:
        return table
    orig_set = set(original[0])
    missing = sorted(orig_set - set(paths.tolist()))
    fixes, notes = {}, []
    for i in np.flatnonzero([p not in orig_set for p in paths]):
        cands = unmangle(paths[i], missing)
        if len(cands) == 1:
            fixes[i] = cands[0][0]
            notes.append(f"{line_word(table)} {table.index[i]}: {paths[i]!r} is read as {cands[0][0]!r} "
                         f"({cands[0][1]})")
    if not fixes:
        return table
    out = table.copy()
    paths = paths.copy()
    for i, p in fixes.items():
        paths[i] = p
    out["path"] = paths
    warn(f"{where}: {len(fixes)} path(s) were changed by a spreadsheet and are read as the audit's ({listed(notes)}).")
    return out


def check_identity(table: pd.DataFrame, record: dict[str, Any], *, where: str) -> None:
    """Refuse a sheet whose rows carry another audit's identity than its record (``audit.json``), or the
    identities of several audits.

    Raises
    ------
    DataError
        Naming the rows (lines) and both audits.
    """
    rid = str(record.get("audit_id") or "")
    if AUDIT_ID_COLUMN not in table.columns:
        if rid:
            warn(f"{where} has no {AUDIT_ID_COLUMN!r} column, so it cannot be checked to be the audit its "
                 f"audit.json describes ({describe_audit(record)}). Keep the column when editing the sheet.")
        return
    ids = table[AUDIT_ID_COLUMN].astype(str).str.strip().to_numpy(dtype=object)
    present = sorted({i for i in ids if i})
    if not present:
        return
    word = line_word(table)
    if rid:
        other = np.flatnonzero((ids != "") & (ids != rid))
        if len(other) == 0:
            return
        foreign = sorted({ids[i] for i in other})
        shown = listed([f"{word} {table.index[i]}: {ids[i]}" for i in other])
        if len(other) == int((ids != "").sum()):
            raise DataError(f"{where} is from audit {', '.join(foreign)}, but the audit.json beside it is from "
                            f"{describe_audit(record)}: the files of two audits are mixed (a copy, or an audit "
                            "interrupted by an older labelsieve). Put the sheet beside its own audit.json, or run "
                            "'labelsieve audit' again.")
        raise DataError(f"{where}: {len(other)} row(s) come from another audit than the rest of the sheet and its "
                        f"audit.json ({describe_audit(record)}): {shown}. Rows pasted from another audit cannot be "
                        "applied to this one: delete them, or apply them with their own audit.")
    if len(present) > 1:
        shown = listed([f"{word} {table.index[i]}: {ids[i]}" for i in range(len(ids)) if ids[i] != present[0]])
        raise DataError(f"{where}: the rows come from {len(present)} different audits ({', '.join(present)}; "
                        f"{shown}). Apply each audit's rows with that audit.")
    if record:
        warn(f"the audit.json beside {where} records no audit identity (written by an older labelsieve, or by "
             f"hand), so the sheet (audit {present[0]}) cannot be checked to belong to it.")


def check_labels(table: pd.DataFrame, record: dict[str, Any], *, where: str) -> pd.DataFrame:
    """The sheet with its ``given_label`` and ``suggested_label`` checked against the audit's classes (see the
    module docstring); a value a spreadsheet changed is repaired (with a warning naming the rows) when one class
    explains it.

    Raises
    ------
    DataError
        A label that is no class of the audit and that no class (or several) explains, or labels changed into
        other classes (the record's ``labels_hash``); the message names the rows.
    """
    classes = [str(c) for c in record.get("classes") or []]
    if not classes:
        return table
    known = set(classes)
    word = line_word(table)
    repaired: list[str] = []
    errors: list[str] = []
    out = table
    for col in ("given_label", "suggested_label"):
        if col not in table.columns:
            continue
        values = table[col].astype(str).to_numpy(dtype=object)
        bad = sorted({v for v in values if v not in known and not (col == "suggested_label" and v == "")})
        if not bad:
            continue
        fix: dict[str, str] = {}
        for v in bad:
            cands = unmangle(v, classes)
            rows = np.flatnonzero(values == v)
            at = ", ".join(str(table.index[i]) for i in rows[:5]) + (" …" if len(rows) > 5 else "")
            if len(cands) == 1:
                fix[v] = cands[0][0]
                repaired.append(f"{word} {at}: {col} {v!r} is read as {cands[0][0]!r} ({cands[0][1]})")
            elif cands:
                errors.append(f"{word} {at}: {col} {v!r} could be any of {[c for c, _ in cands]} (changed by a "
                              "spreadsheet)")
            else:
                errors.append(f"{word} {at}: {col} {v!r} is not a class of this audit")
        if fix:
            if out is table:
                out = table.copy()
            out[col] = [fix.get(v, v) for v in values]
    if errors:
        raise DataError(f"{where}: {len(errors)} label(s) are not classes of this audit ({listed(errors)}). Its "
                        f"audit.json lists {len(classes)} classes ({listed(classes)}). A spreadsheet may have "
                        "changed them (a number, a date, trimmed spaces): restore the original values, e.g. from "
                        "audit.xlsx or a fresh 'labelsieve audit', or correct labels with relabel:<class> in the "
                        "review column, not by editing given_label.")
    if repaired:
        warn(f"{where}: {len(repaired)} label value(s) were changed by a spreadsheet and are read as the audit wrote "
             f"them ({listed(repaired)}).")
    _check_labels_hash(out, record, where=where)
    return out


def _check_labels_hash(table: pd.DataFrame, record: dict[str, Any], *, where: str) -> None:
    """Refuse a sheet of the audit's rows whose labels differ from those the audit wrote (a label changed into
    another class: ``12`` where both ``12`` and ``0012`` are classes)."""
    recorded = record.get("labels_hash")
    inp = record.get("input") or {}
    if not recorded or "path" not in table.columns:
        return
    paths = table["path"].astype(str).tolist()
    if inp.get("paths_hash") and paths_hash(paths) != inp.get("paths_hash"):
        return  # rows were deleted or added: reported by apply's row check (labelsieve.audit.review.sheet_vs_record)
    if labels_hash(table) == recorded:
        return
    original = recorded_input(record)
    if original is not None and original[1] is not None and "given_label" in table.columns:
        given_of = dict(zip(*original, strict=True))
        given = table["given_label"].astype(str).to_numpy(dtype=object)
        changed = [f"{line_word(table)} {table.index[i]} ({paths[i]}): {given[i]!r}, the audit's input says "
                   f"{given_of[paths[i]]!r}" for i in range(len(paths))
                   if paths[i] in given_of and given_of[paths[i]] != given[i]]
        if changed:
            raise DataError(f"{where}: {len(changed)} given label(s) differ from those {describe_audit(record)} was "
                            f"made on ({listed(changed)}): a spreadsheet or an edit changed a label into another "
                            "class. Restore given_label from the original audit; correct labels with relabel:<class> "
                            "in the review column.")
    raise DataError(f"{where}: the given or suggested labels of some rows differ from those {describe_audit(record)} "
                    "wrote (audit.json 'labels_hash'), although each is one of its classes: a spreadsheet or an edit "
                    "changed a label into another class (e.g. '0012' into '12' where both are classes). Restore "
                    "given_label and suggested_label from the original audit (audit.xlsx keeps them as text); "
                    "correct labels with relabel:<class> in the review column.")
