"""Turning a reviewed audit into corrected labels: ``labelsieve apply`` and ``train --clean``.

A reviewer fills the ``review`` column of ``audit.csv`` with one decision per row they looked at:

========================  =====================================================================
``review``                result
========================  =====================================================================
``keep``                  keep the row with its ``given_label``
``relabel``               keep the row with its ``suggested_label``
``relabel:<class>``       keep the row with ``<class>`` (a known class)
``drop``                  remove the row
empty                     not flagged: keep with ``given_label``; flagged (``is_noisy``): keep
                          with ``given_label`` by default, or drop (``drop_unreviewed_flagged``),
                          or take the suggestion (``accept_suggestions``)
========================  =====================================================================

Rows whose ``issue`` is ``unreadable`` are always removed: their image cannot be decoded. Review
values are trimmed and case-insensitive (``" Relabel: forest "`` works when ``forest`` matches a
class case-insensitively and unambiguously). :func:`kept_rows` holds the one rule; :func:`apply_review`
reads the CSV, applies it and writes ``path,label`` atomically, and the trainer calls
:func:`kept_rows` so that training and ``labelsieve apply`` can never disagree.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from labelsieve.audit.decisions import merge_reviews
from labelsieve.audit.schema import REVIEW_REQUIRED, flagged_mask, line_word, read_audit
from labelsieve.core.errors import DataError, check_param
from labelsieve.core.io import atomic_open

__all__ = ["ALLOWED_REVIEWS", "apply_review", "flagged_mask", "kept_rows", "read_audit"]

#: The review values a reviewer may write (plus an empty cell), as shown in error messages.
ALLOWED_REVIEWS = "keep, relabel, relabel:<class>, drop (or leave the cell empty)"

_ORDER_COLUMNS = ("index", "row")
_MAX_LISTED = 5


@dataclass(frozen=True)
class _Decisions:
    """Result of applying the review rule (internal)."""

    rows: pd.DataFrame
    kept: int
    relabelled: int
    dropped: int
    unreviewed_flagged: int


def _text(table: pd.DataFrame, column: str, *, strip: bool = False) -> np.ndarray:
    """A column as an object array of strings ("" for missing or absent values).

    Paths and labels are used as written (the audit writes them trimmed); ``strip`` trims the
    non-empty values of the columns a person edits.
    """
    if column not in table.columns:
        return np.full(len(table), "", dtype=object)
    col = table[column]
    values = col.to_numpy(dtype=object, na_value="")
    if pd.api.types.infer_dtype(values, skipna=False) not in ("string", "empty"):
        values = np.array(["" if pd.isna(v) else str(v) for v in values], dtype=object)
    if strip:
        nonempty = np.flatnonzero(values != "")
        if len(nonempty):
            values = values.copy()
            values[nonempty] = [v.strip() for v in values[nonempty]]
    return values


def _lower(values: np.ndarray) -> np.ndarray:
    """Lower-case an object array of strings, touching only the non-empty ones."""
    out = np.full(len(values), "", dtype=object)
    nonempty = np.flatnonzero(values != "")
    if len(nonempty):
        out[nonempty] = [v.lower() for v in values[nonempty]]
    return out


def _did_you_mean(value: str) -> str:
    close = difflib.get_close_matches(value, ["keep", "relabel", "drop"], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _resolve_classes(targets: np.ndarray, known: list[str], where: str, lines: list[object],
                     line_name: str) -> np.ndarray:
    """Map ``relabel:<class>`` targets to known class names (exact, else unique case-insensitive)."""
    known_set = set(known)
    by_lower: dict[str, list[str]] = {}
    for k in known:
        by_lower.setdefault(k.lower(), []).append(k)
    out = targets.copy()
    bad: list[str] = []
    for i, t in enumerate(targets):
        if t in known_set:
            continue
        cands = by_lower.get(t.lower(), [])
        if len(cands) == 1:
            out[i] = cands[0]
            continue
        if not t:
            bad.append(f"{line_name} {lines[i]}: 'relabel:' names no class")
        elif len(cands) > 1:
            bad.append(f"{line_name} {lines[i]}: class {t!r} is ambiguous (matches {sorted(cands)})")
        else:
            close = difflib.get_close_matches(t.lower(), list(by_lower), n=1)
            hint = f"; did you mean {by_lower[close[0]][0]!r}?" if close else ""
            bad.append(f"{line_name} {lines[i]}: unknown class {t!r} in 'relabel:{t}'{hint}")
    if bad:
        listed = sorted(known)
        shown = "; ".join(bad[:_MAX_LISTED]) + (" …" if len(bad) > _MAX_LISTED else "")
        raise DataError(f"{where}: {len(bad)} 'relabel:<class>' value(s) name no known class ({shown}). "
                        f"Known classes: {', '.join(listed[:20])}{' …' if len(listed) > 20 else ''}.")
    return out


def _decide(
    audit: pd.DataFrame,
    *,
    classes: list[str] | None,
    drop_unreviewed_flagged: bool,
    accept_suggestions: bool,
    where: str,
    owner: str,
) -> _Decisions:
    """Apply the review rule to every row (vectorised; the one implementation of the rule)."""
    check_param(owner, "drop_unreviewed_flagged", drop_unreviewed_flagged,
                isinstance(drop_unreviewed_flagged, bool), "a bool")
    check_param(owner, "accept_suggestions", accept_suggestions,
                isinstance(accept_suggestions, bool) and not (accept_suggestions and drop_unreviewed_flagged),
                "a bool, and not True together with drop_unreviewed_flagged=True (choose one treatment "
                "of unreviewed flagged rows)")
    missing = [c for c in REVIEW_REQUIRED if c not in audit.columns]
    if missing:
        raise DataError(f"{where}: no column {', '.join(repr(m) for m in missing)}. An audit needs the "
                        f"columns {', '.join(REVIEW_REQUIRED)}.")
    line_name = line_word(audit)
    lines = audit.index

    path = _text(audit, "path")
    given = _text(audit, "given_label")
    suggested = _text(audit, "suggested_label")
    flagged = flagged_mask(audit, where=where)
    unreadable = _lower(_text(audit, "issue", strip=True)) == "unreadable"
    raw = _text(audit, "review", strip=True)

    empty = raw == ""
    low = _lower(raw)
    is_keep = low == "keep"
    is_drop = low == "drop"
    is_relabel = low == "relabel"
    is_relabel_to = np.zeros(len(raw), dtype=bool)
    cand = np.flatnonzero(~(empty | is_keep | is_drop | is_relabel))
    if len(cand):
        head = np.array([s.split(":", 1)[0].strip() for s in low[cand]], dtype=object)
        has_colon = np.array([":" in s for s in low[cand]], dtype=bool)
        ok = has_colon & (head == "relabel")
        is_relabel_to[cand[ok]] = True
        bad = cand[~ok]
        if len(bad):
            shown = "; ".join(f"{line_name} {lines[i]}: {raw[i]!r}{_did_you_mean(low[i])}"
                              for i in bad[:_MAX_LISTED])
            more = " …" if len(bad) > _MAX_LISTED else ""
            raise DataError(f"{where}: {len(bad)} unknown review value(s) ({shown}{more}). "
                            f"Allowed values: {ALLOWED_REVIEWS}.")

    label = given.copy()
    active = ~unreadable

    # relabel -> suggested_label (an error where the audit has no suggestion for the row)
    take_sugg = is_relabel & active
    no_sugg = take_sugg & (suggested == "")
    if no_sugg.any():
        shown = ", ".join(str(lines[i]) for i in np.flatnonzero(no_sugg)[:_MAX_LISTED])
        raise DataError(f"{where}: 'relabel' on {int(no_sugg.sum())} row(s) without a suggested_label "
                        f"({line_name} {shown}). Write relabel:<class> or drop for those rows.")
    # relabel:<class> -> that class
    to_idx = np.flatnonzero(is_relabel_to)
    if len(to_idx):
        if classes is not None:
            known = sorted(set(classes))
        else:
            both = pd.unique(np.concatenate([given, suggested]))
            known = sorted(str(c) for c in both if c != "")
        targets = np.array([raw[i].split(":", 1)[1].strip() for i in to_idx], dtype=object)
        label[to_idx] = _resolve_classes(targets, known, where, [lines[i] for i in to_idx], line_name)
    unreviewed = flagged & empty & active
    if accept_suggestions:
        take_sugg = take_sugg | (unreviewed & (suggested != ""))
    label[take_sugg] = suggested[take_sugg]

    drop = unreadable | is_drop
    if drop_unreviewed_flagged:
        drop = drop | unreviewed
    keep = ~drop
    changed = keep & (label != given)

    rows = pd.DataFrame({"path": path[keep], "label": label[keep]})
    order_col = next((c for c in _ORDER_COLUMNS if c in audit.columns), None)
    if order_col is not None:
        order = pd.to_numeric(pd.Series(audit[order_col].to_numpy()[keep]), errors="coerce")
        if order.isna().any():
            i = int(np.flatnonzero(keep)[int(np.flatnonzero(order.isna().to_numpy())[0])])
            raise DataError(f"{where}, {line_name} {lines[i]}: the {order_col!r} column holds "
                            f"{audit[order_col].iloc[i]!r}, not a row number. Restore it from the original "
                            f"audit, or delete the column to sort the output by path.")
        rows = rows.iloc[np.argsort(order.to_numpy(), kind="stable")]
    else:
        rows = rows.sort_values("path", kind="stable")
    rows = rows.reset_index(drop=True)
    return _Decisions(
        rows=rows,
        kept=int(keep.sum() - changed.sum()),
        relabelled=int(changed.sum()),
        dropped=int(drop.sum()),
        unreviewed_flagged=int(unreviewed.sum()),
    )


def kept_rows(
    audit: pd.DataFrame,
    *,
    classes: list[str] | None = None,
    drop_unreviewed_flagged: bool = False,
    accept_suggestions: bool = False,
    source: str = "audit table",
) -> pd.DataFrame:
    """The rows a reviewed audit keeps, with their final labels.

    This is the one rule both ``labelsieve apply`` and ``labelsieve train --clean`` use (see the
    module docstring for the table of decisions).

    Parameters
    ----------
    audit : DataFrame
        Audit table with columns ``path``, ``given_label``, ``is_noisy`` and optionally
        ``suggested_label``, ``issue``, ``review`` and an ``index`` or ``row`` column giving the input
        order. Missing values read as empty. If the index is named ``line`` (as from
        :func:`read_audit`), error messages cite those CSV line numbers, else the index as rows.
    classes : list of str, optional
        Classes ``relabel:<class>`` may name. Default: every given and suggested label in ``audit``.
    drop_unreviewed_flagged : bool, default False
        Drop flagged rows (``is_noisy``) with an empty review instead of keeping their given label.
    accept_suggestions : bool, default False
        Give flagged rows with an empty review their ``suggested_label`` (where there is one) instead
        of keeping their given label. Cannot be combined with ``drop_unreviewed_flagged``.
    source : str, default "audit table"
        Name of the audit in error messages (e.g. its file path).

    Returns
    -------
    DataFrame
        Columns ``path`` and ``label`` for the kept rows, in input order when ``audit`` has an
        ``index``/``row`` column, else sorted by path; a fresh RangeIndex.

    Raises
    ------
    DataError
        For an unknown review value, a ``relabel:<class>`` naming no known class, ``relabel`` on a row
        without a suggestion, an unreadable ``is_noisy`` value or a missing required column; the
        message names the line (or row) and the allowed values.
    ParameterError
        If both ``drop_unreviewed_flagged`` and ``accept_suggestions`` are True.
    """
    return _decide(audit, classes=classes, drop_unreviewed_flagged=drop_unreviewed_flagged,
                   accept_suggestions=accept_suggestions, where=source, owner="kept_rows").rows


def apply_review(
    audit_csv: Path,
    *,
    out_csv: Path,
    classes: list[str] | None = None,
    drop_unreviewed_flagged: bool = False,
    accept_suggestions: bool = False,
    reviews: Sequence[pd.DataFrame] = (),
) -> dict[str, int]:
    """Write corrected labels from a reviewed ``audit.csv`` (``labelsieve apply``).

    Parameters
    ----------
    audit_csv : Path
        The reviewed audit (see :func:`read_audit` for the formats accepted).
    out_csv : Path
        Where to write ``path,label`` for the kept rows (atomically: on any error the file is not
        created, and an existing one is left unchanged).
    classes : list of str, optional
        Classes ``relabel:<class>`` may name. Default: every given and suggested label in the audit.
    drop_unreviewed_flagged : bool, default False
        Drop flagged rows the reviewer left empty instead of keeping their given label.
    accept_suggestions : bool, default False
        Relabel flagged rows the reviewer left empty to their suggested label.
    reviews : sequence of DataFrame
        Decisions made elsewhere (a reviews CSV from audit.html, Label Studio, FiftyOne; see
        :mod:`labelsieve.audit.decisions`), written into the audit's ``review`` column first, each
        checked against it (:func:`~labelsieve.audit.decisions.merge_reviews`).

    Returns
    -------
    dict
        ``kept`` (rows written with their given label), ``relabelled`` (rows written with a different
        label), ``dropped`` (rows removed: ``drop``, unreadable, and unreviewed flagged rows if
        ``drop_unreviewed_flagged``) and ``unreviewed_flagged`` (readable flagged rows with an empty
        review, whatever was done with them). ``kept + relabelled + dropped`` is the number of rows.

    Raises
    ------
    DataError
        As :func:`kept_rows`, with the CSV line number, and for an unreadable audit file.
    ParameterError
        If both ``drop_unreviewed_flagged`` and ``accept_suggestions`` are True.
    """
    audit = read_audit(audit_csv)
    for extra in reviews:
        audit = merge_reviews(audit, extra, where=str(audit_csv))
    dec = _decide(audit, classes=classes, drop_unreviewed_flagged=drop_unreviewed_flagged,
                  accept_suggestions=accept_suggestions, where=str(audit_csv), owner="apply_review")
    with atomic_open(out_csv) as f:
        dec.rows.to_csv(f, index=False, lineterminator="\n")
    return {"kept": dec.kept, "relabelled": dec.relabelled, "dropped": dec.dropped,
            "unreviewed_flagged": dec.unreviewed_flagged}
