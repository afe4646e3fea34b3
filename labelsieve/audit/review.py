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

Rows whose ``issue`` is ``unreadable`` are always removed: their image cannot be decoded (a ``keep`` or
``relabel`` written on one is reported, not silently counted as a drop). Review values are trimmed and
case-insensitive (``" Relabel: forest "`` works when ``forest`` matches a class case-insensitively and
unambiguously). :func:`kept_rows` holds the one rule; :func:`apply_review` reads the CSV, applies it and
writes ``path,label`` atomically, and the trainer calls :func:`kept_rows` so that training and
``labelsieve apply`` can never disagree.

The reviewer's decisions are protected on every path: a sheet that lists one image twice is refused;
rows deleted from the sheet, or added to it, are reported (:func:`sheet_vs_record` compares the sheet
with the ``audit.json`` written beside it); ``apply`` refuses to write over its input or over any file
that holds review decisions, and checks that it can write its output before it reads anything.
"""

from __future__ import annotations

import difflib
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labelsieve.audit.auditset import check_audit_output, keep_reviewed_copy, open_audit, recorded_input
from labelsieve.audit.checksample import CheckDesign
from labelsieve.audit.decisions import merge_reviews
from labelsieve.audit.estimate import TARGET_WIDTH, estimate_audit, suggested_check_size
from labelsieve.audit.schema import (
    REVIEW_OPTIONAL,
    REVIEW_REQUIRED,
    count_reviews,
    flagged_mask,
    line_word,
    paths_hash,
    read_audit,
)
from labelsieve.core.errors import DataError, OutputError, check_param
from labelsieve.core.io import atomic_open, line_end, neutralise_frame
from labelsieve.core.paths import check_output_file, listed
from labelsieve.core.progress import info, warn
from labelsieve.core.spreadsheet import unmangle

__all__ = ["ALLOWED_REVIEWS", "apply_review", "check_apply_output", "check_audit_output", "flagged_mask",
           "keep_reviewed_copy", "kept_rows", "read_audit", "sheet_vs_record"]

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
    notes: list[str] = field(default_factory=list)


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
                     line_name: str) -> tuple[np.ndarray, list[str]]:
    """Map ``relabel:<class>`` targets to known class names (exact, else unique case-insensitive)."""
    known_set = set(known)
    by_lower: dict[str, list[str]] = {}  # review values are trimmed: match classes trimmed, in any case and form
    for k in known:
        by_lower.setdefault(_loose(k), []).append(k)
    out = targets.copy()
    bad: list[str] = []
    repaired: list[str] = []
    for i, t in enumerate(targets):
        if t in known_set:
            continue
        cands = by_lower.get(_loose(t), [])
        if len(cands) == 1:
            out[i] = cands[0]
            continue
        mangled = unmangle(t, known) if t and not cands else []
        if len(mangled) == 1:  # a class a spreadsheet changed (0012 -> 12, 3/4 -> 03/04/26, trimmed or re-cased)
            out[i] = mangled[0][0]
            repaired.append(f"{line_name} {lines[i]}: 'relabel:{t}' is read as 'relabel:{mangled[0][0]}' "
                            f"({mangled[0][1]})")
        elif not t:
            bad.append(f"{line_name} {lines[i]}: 'relabel:' names no class")
        elif len(cands) > 1:
            bad.append(f"{line_name} {lines[i]}: class {t!r} is ambiguous (matches {sorted(cands)})")
        elif mangled:
            bad.append(f"{line_name} {lines[i]}: class {t!r} in 'relabel:{t}' could be any of "
                       f"{[c for c, _ in mangled]} (a spreadsheet changed it)")
        else:
            close = difflib.get_close_matches(_loose(t), list(by_lower), n=1)
            hint = f"; did you mean {by_lower[close[0]][0]!r}?" if close else ""
            bad.append(f"{line_name} {lines[i]}: unknown class {t!r} in 'relabel:{t}'{hint}")
    if bad:
        listed = sorted(known)
        shown = "; ".join(bad[:_MAX_LISTED]) + (" …" if len(bad) > _MAX_LISTED else "")
        raise DataError(f"{where}: {len(bad)} 'relabel:<class>' value(s) name no known class ({shown}). "
                        f"Known classes: {', '.join(listed[:20])}{' …' if len(listed) > 20 else ''}.")
    return out, ([f"{where}: {len(repaired)} 'relabel:<class>' value(s) were changed by a spreadsheet and are read "
                  f"as the class they name ({'; '.join(repaired[:_MAX_LISTED])})."] if repaired else [])


def _loose(label: str) -> str:
    """A class name as review values are matched to it: trimmed, case-folded, NFC."""
    return unicodedata.normalize("NFC", label.strip()).casefold()


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
    _refuse_repeated_paths(path, lines, where, line_name)
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
    resolved_notes: list[str] = []

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
        label[to_idx], resolved_notes = _resolve_classes(targets, known, where, [lines[i] for i in to_idx], line_name)
    unreviewed = flagged & empty & active
    if accept_suggestions:
        take_sugg = take_sugg | (unreviewed & (suggested != ""))
    label[take_sugg] = suggested[take_sugg]

    notes = list(resolved_notes)
    overridden = np.flatnonzero(unreadable & (is_keep | is_relabel | is_relabel_to))
    if len(overridden):
        shown = listed([f"{line_name} {lines[i]}: {raw[i]!r}" for i in overridden])
        notes.append(f"{where}: {len(overridden)} row(s) marked keep or relabel are unreadable images "
                     f"(issue=unreadable), and were dropped: their files cannot be decoded ({shown}). Replace the "
                     "files and audit again to keep them.")
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
        notes=notes,
    )


def _refuse_repeated_paths(path: np.ndarray, lines: Any, where: str, line_name: str) -> None:
    """A sheet listing one image twice (a pasted row) has two decisions for it: refuse, naming the lines."""
    norm = pd.Series(path, dtype=object)
    odd = norm.str.contains(r"(?:^|/)\.\.?(?:/|$)|//", regex=True).to_numpy(dtype=bool)  # ./a.jpg, a//b.jpg
    if odd.any():
        norm[odd] = [os.path.normpath(p) for p in norm[odd]]
    dup = norm.duplicated(keep=False).to_numpy()
    if not dup.any():
        return
    groups: dict[str, list[str]] = {}
    for i in np.flatnonzero(dup):
        groups.setdefault(norm.iloc[i], []).append(str(lines[i]))
    shown = listed([f"{p} on {line_name}s {', '.join(ls)}" for p, ls in groups.items()])
    raise DataError(f"{where}: {len(groups)} image(s) are listed more than once ({shown}). Each image needs one "
                    "row and one decision: delete the extra rows.")


def sheet_vs_record(audit: pd.DataFrame, record: dict[str, Any], *, where: str) -> tuple[int, list[str]]:
    """Compare a sheet's rows with the audit that wrote them (its ``audit.json`` record).

    Rows deleted from a sheet would silently vanish from the labels, and rows added to it would appear
    from nowhere; this finds both. With the audit's ``input.paths_hash`` and its input still readable
    (the labels CSV or image folder recorded in ``input``), the rows are named; otherwise counted.

    Parameters
    ----------
    audit : DataFrame
        The sheet (as :func:`read_audit` returns it).
    record : dict
        The audit's record (:func:`labelsieve.audit.schema.audit_record`); ``{}`` checks nothing.
    where : str
        The sheet's name, for messages.

    Returns
    -------
    missing : int
        Rows of the audit the sheet no longer has (0 when unknown).
    notes : list of str
        One message per finding (deleted rows, added rows, edited paths), empty when the sheet matches.
    """
    n_audit = record.get("n_images")
    if not isinstance(n_audit, int):
        return 0, []
    inp = record.get("input") or {}
    sheet_paths = _text(audit, "path").tolist()
    n_sheet = len(sheet_paths)
    recorded_hash = inp.get("paths_hash")
    if n_sheet == n_audit and (recorded_hash is None or recorded_hash == paths_hash(sheet_paths)):
        return 0, []
    recovered = recorded_input(record)
    original = recovered[0] if recovered is not None else None
    notes: list[str] = []
    if original is not None:
        sheet_set, orig_set = set(sheet_paths), set(original)
        deleted = [p for p in original if p not in sheet_set]
        added = [p for p in sheet_paths if p not in orig_set]
        if deleted:
            notes.append(f"{where}: {len(deleted)} row(s) of the audit were deleted from the sheet and are left out "
                         f"like dropped rows ({listed(deleted)}). Restore them from the audit, or write 'drop' "
                         "in their review cell to drop them on purpose.")
        if added:
            notes.append(f"{where}: {len(added)} row(s) name images the audit did not have ({listed(added)}); they "
                         "are used as written. Check for edited paths.")
        return len(deleted), notes
    if n_sheet < n_audit:
        notes.append(f"{where}: the sheet has {n_sheet} rows but the audit wrote {n_audit} (audit.json): "
                     f"{n_audit - n_sheet} row(s) were deleted and are left out like dropped rows. Restore them "
                     "from the audit, or write 'drop' in their review cell to drop them on purpose.")
        return n_audit - n_sheet, notes
    notes.append(f"{where}: the sheet's rows differ from the {n_audit} the audit wrote (audit.json): "
                 f"{n_sheet} rows, with other paths. Check for added, deleted or edited rows.")
    return 0, notes


def record_classes(record: dict[str, Any]) -> list[str] | None:
    """The classes an audit's record lists (``relabel:<class>`` may name them), or None for a record without."""
    classes = record.get("classes")
    return [str(c) for c in classes] if classes else None


def check_apply_output(audit_csv: Path, out_csv: Path) -> None:
    """Refuse, before any work, an ``apply`` output that is its input, holds review decisions, or cannot be
    written."""
    out = Path(out_csv).expanduser()
    if out.exists() and Path(audit_csv).exists() and os.path.samefile(out, audit_csv):
        raise OutputError(f"Refusing to write the labels over the reviewed audit they come from ({audit_csv}): that "
                          "would erase the review. Give another output file, e.g. -o labels.clean.csv.")
    if out.is_file():
        n = count_reviews(out)
        if n != 0:
            what = f"{n} review decision(s)" if n else "content that is not a labels CSV"
            raise OutputError(f"Refusing to replace {out}: it holds {what}. Give another output file, or move it "
                              "away first.")
    check_output_file(out, what="the labels file (-o)")


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
        without a suggestion, an unreadable ``is_noisy`` value, a missing required column, or an image
        listed on more than one row; the message names the line (or row) and the allowed values.
    ParameterError
        If both ``drop_unreviewed_flagged`` and ``accept_suggestions`` are True.
    """
    dec = _decide(audit, classes=classes, drop_unreviewed_flagged=drop_unreviewed_flagged,
                  accept_suggestions=accept_suggestions, where=source, owner="kept_rows")
    for note in dec.notes:
        warn(note)
    return dec.rows


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
        created, and an existing one is left unchanged). Cells a spreadsheet would read as a formula get a
        leading ``'`` (:func:`labelsieve.core.io.neutralise_cell`); labelsieve's readers remove it.
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
        review, whatever was done with them). ``kept + relabelled + dropped`` is the number of rows of
        the sheet. ``missing``: rows the audit wrote (its ``audit.json``) that were deleted from the sheet,
        and so are not in ``out_csv`` either. With ``reviews``, ``stale_decisions``: decisions made on another
        row (another given label, another picture) that were not used
        (:func:`~labelsieve.audit.decisions.stale_reason`). Warnings (deleted or added rows, ``keep`` on an unreadable
        image) are printed on stderr.

    Raises
    ------
    DataError
        As :func:`kept_rows`, with the CSV line number, and for an unreadable audit file.
    OutputError
        Before reading anything: ``out_csv`` is ``audit_csv``, holds review decisions, or cannot be
        written.
    ParameterError
        If both ``drop_unreviewed_flagged`` and ``accept_suggestions`` are True.
    """
    check_apply_output(Path(audit_csv), Path(out_csv))
    audit, record = open_audit(audit_csv, optional=(*REVIEW_OPTIONAL, "rank", "p_clean", "check"))
    design = CheckDesign.from_dict(record["check_sample"]) if record.get("check_sample") else None
    for extra in reviews:
        audit = merge_reviews(audit, extra, where=str(audit_csv))
    dec = _decide(audit, classes=classes if classes is not None else record_classes(record),
                  drop_unreviewed_flagged=drop_unreviewed_flagged, accept_suggestions=accept_suggestions,
                  where=str(audit_csv), owner="apply_review")
    missing, notes = sheet_vs_record(audit, record, where=str(audit_csv))
    with atomic_open(out_csv) as f:
        neutralise_frame(dec.rows).to_csv(f, index=False, lineterminator=line_end(dec.rows))
    for note in [*dec.notes, *notes]:
        warn(note)
    counts = {"kept": dec.kept, "relabelled": dec.relabelled, "dropped": dec.dropped,
              "unreviewed_flagged": dec.unreviewed_flagged, "missing": missing}
    if reviews:
        counts["stale_decisions"] = int(audit.attrs.get("stale_decisions", 0))
    if design is not None and {"rank", "p_clean", "check"} <= set(audit.columns):
        est = estimate_audit(audit, design)
        counts["check_reviewed"] = est["check_reviewed"] if est is not None else 0
        info(describe_estimate(est, design.size))
    return counts


def describe_estimate(est: dict[str, Any] | None, check_size: int) -> str:
    """One line on what the reviewed check sample says (or that nothing of it is reviewed yet)."""
    if est is None:
        return (f"Check sample: none of its {check_size} rows reviewed yet. Review them (column 'check', or the "
                "page's 'Check this audit') to learn the share of wrong labels with an interval that holds whatever "
                "the model.")
    lo, hi = est["interval"]
    line = (f"Check sample: {est['check_reviewed']} of {check_size} rows reviewed (and {est['exact_rows']} counted "
            f"exactly) -> wrong labels {est['rate']:.1%} (95% interval {lo:.1%}-{hi:.1%}), about "
            f"{est['wrong']:,.0f} of {est['rows']:,} images")
    if est.get("precision") is not None:
        plo, phi = est["precision_interval"]
        line += f"; precision of the flags {est['precision']:.2f} ({plo:.2f}-{phi:.2f})"
    if est.get("recall") is not None:
        rlo, rhi = est["recall_interval"]
        line += f", recall {est['recall']:.2f} ({rlo:.2f}-{rhi:.2f})"
    line += "."
    more = suggested_check_size(est, check_size)
    if more is not None:
        line += (f" The interval is {hi - lo:.1%} wide; for about {TARGET_WIDTH / 2:.0%} either way, re-audit with "
                 f"--reviewed and --check-size {more} and review that sample (its width shrinks as 1/sqrt(rows)).")
    return line
