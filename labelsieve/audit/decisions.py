"""Reviewer decisions that live outside ``audit.csv``, and carrying them onto an audit's ``review`` column.

A reviewer may decide in the spreadsheet (the ``review`` column of ``audit.csv``), in ``audit.html``
(which downloads a *reviews CSV*), in Label Studio or in FiftyOne (:mod:`labelsieve.audit.handoff`).
Every source is turned into the same thing: a table of ``path, review`` (plus ``given_label`` and
``suggested_label`` where the source knows them), with the spreadsheet's review values (``keep``,
``drop``, ``relabel``, ``relabel:<class>``). :func:`merge_reviews` writes such a table into the audit's
``review`` column, and from there :func:`labelsieve.audit.review.kept_rows` applies the one rule, so a
decision means the same wherever it was made.

A reviews CSV has the columns ``path, given_label, suggested_label, review`` (one row per decided
image; ``given_label`` and ``suggested_label`` are what the reviewer saw), and, from audit.html, the check
sample's design per row (:data:`labelsieve.audit.checksample.DESIGN_COLUMNS`, with ``is_noisy`` and ``issue``;
every check row is listed, decided or not, so that every band's size is there): the decisions give a
design-based estimate (:mod:`labelsieve.audit.estimate`) wherever the file goes. An ``audit.csv`` with a
filled ``review`` column reads as one too (its design comes from the audit.json beside it).

A reviews CSV also carries the identity of the audit it was made on (``audit_id``) and the content digest
of each decided image (``digest``), as ``audit.csv`` does.

**One rule for a decision made on another row** (:func:`stale_reason`, shared by ``apply --reviews``,
``train --clean --reviews`` and ``audit --reviewed``): a decision is *stale*, and is not used, when the
image it was made on has other content now (its digest differs), or when it was made on another given label
and does not give the row its current label. A ``keep`` decided on label X does not bring X back after the
label was fixed to Y; a ``relabel:Y`` decided on X is simply consistent with a label now Y. Stale decisions
are named in a warning (and counted); they never change a label.

Merging never drops or overrides a decision silently: a path the audit does not hold, or a decision that
differs from one already in the audit's ``review`` column, is an error naming the rows.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd

from labelsieve.audit.auditset import AUDIT_TAG, check_identity
from labelsieve.audit.checksample import DESIGN_COLUMNS, CheckDesign, design_columns, design_from_columns
from labelsieve.audit.schema import audit_record, line_word, read_audit
from labelsieve.core.errors import DataError
from labelsieve.core.fileset import recover
from labelsieve.core.progress import warn

__all__ = ["REVIEWS_COLUMNS", "decision_outcome", "merge_reviews", "normalise_review", "read_reviews", "reviews_frame",
           "stale_reason"]

#: The sheets of an audit's own folder: read as reviews, they are checked against the audit.json beside them.
AUDIT_SHEETS = ("audit.csv", "audit.xlsx")
#: Columns of a reviews CSV, in order.
REVIEWS_COLUMNS = ("path", "given_label", "suggested_label", "review", "digest", "audit_id")
_MAX_LISTED = 5


def _listed(items: list[str]) -> str:
    return "; ".join(items[:_MAX_LISTED]) + (" …" if len(items) > _MAX_LISTED else "")


def normalise_review(value: str, suggested: str = "") -> str:
    """A review value in a form two decisions can be compared by: trimmed, lower-case keywords, and
    ``relabel`` written as ``relabel:<suggested>`` when the suggestion is known.

    Class names keep their case but compare case-insensitively (the review rule resolves them so);
    unknown values are returned trimmed, for the review rule to reject with its own message.
    """
    v = str(value).strip()
    low = v.lower()
    if low in ("keep", "drop", ""):
        return low
    if low == "relabel":
        return f"relabel:{suggested.strip().lower()}" if suggested.strip() else "relabel"
    head, sep, tail = v.partition(":")
    if sep and head.strip().lower() == "relabel":
        return f"relabel:{tail.strip().lower()}"
    return v


def decision_outcome(review: str, given: str, suggested: str) -> str | None:
    """The label a decision gives its row, as decided: ``given`` for keep, the class of a relabel (the
    suggestion as the reviewer saw it for a bare ``relabel``), ``""`` for drop; None for a value that is no
    decision (the review rule rejects it with its own message)."""
    v = normalise_review(review, suggested)
    if v == "keep":
        return given
    if v == "drop":
        return ""
    if v.startswith("relabel:"):
        head, _, tail = str(review).partition(":")
        return tail.strip() if head.strip().lower() == "relabel" and tail.strip() else suggested.strip()
    return None


def stale_reason(*, decided_given: str, current_given: str, outcome: str | None, decided_digest: str = "",
                 current_digest: str = "") -> str | None:
    """Why a decision made on a row no longer applies to it (the module's one rule), or None when it does.

    Parameters
    ----------
    decided_given, current_given : str
        The row's given label when the decision was made ("" when unknown) and now.
    outcome : str or None
        :func:`decision_outcome` of the decision.
    decided_digest, current_digest : str
        The image's content digest when the decision was made and now ("" when unknown).
    """
    if decided_digest and current_digest and decided_digest != current_digest:
        return f"the image is another picture now (digest {decided_digest} when decided, {current_digest} now)"
    moved = decided_given and decided_given != current_given
    if moved and (outcome is None or _loose(outcome) != _loose(current_given)):
        what = "drop" if outcome == "" else f"{outcome!r}" if outcome is not None else "the decision"
        return f"decided on the given label {decided_given!r} (giving {what}); the label is now {current_given!r}"
    return None


def _loose(label: str) -> str:
    return unicodedata.normalize("NFC", str(label).strip()).casefold()


def reviews_frame(paths: list[str], reviews: list[str], *, source: str, given: list[str] | None = None,
                  suggested: list[str] | None = None, digests: list[str] | None = None,
                  audit_ids: list[str] | None = None) -> pd.DataFrame:
    """A reviews table (``path, review`` and optional ``given_label``/``suggested_label``/``digest``/``audit_id``)
    named ``source``.

    Rows with an empty review are left out; the table's ``attrs["source"]`` names it in messages.
    """
    data: dict[str, list[str]] = {"path": [str(p) for p in paths], "review": [str(r).strip() for r in reviews]}
    if given is not None:
        data["given_label"] = [str(g) for g in given]
    if suggested is not None:
        data["suggested_label"] = [str(s) for s in suggested]
    if digests is not None:
        data["digest"] = [str(d) for d in digests]
    if audit_ids is not None:
        data["audit_id"] = [str(a) for a in audit_ids]
    df = pd.DataFrame(data, dtype=object)
    df.index = pd.RangeIndex(1, len(df) + 1, name="row")
    df = df[df["review"] != ""]
    df.attrs["source"] = source
    return _check_unique(df, source)


def read_reviews(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Decisions from a CSV with ``path`` and ``review`` columns (a reviews CSV, or a reviewed audit.csv).

    Parameters
    ----------
    path : path
        The CSV. Read by the one audit reader (:func:`labelsieve.audit.schema.read_audit`), so a file
        a spreadsheet saved back reads the same.

    Returns
    -------
    DataFrame
        ``path``, ``review`` and, when present, ``given_label``, ``suggested_label``, ``digest`` and
        ``audit_id``, for the rows with a non-empty review; indexed by CSV line; ``attrs["source"]`` is the
        file name.

    Raises
    ------
    DataError
        The file cannot be read, has no ``path`` or ``review`` column, or gives one path two different
        decisions.
    """
    p = Path(path)
    if p.name in AUDIT_SHEETS:  # an audit's own sheet: it must be the audit its audit.json describes
        recover(p.parent, AUDIT_TAG)
    df = read_audit(path, required=("path", "review"),
                    optional=("given_label", "suggested_label", "digest", "audit_id", "is_noisy", "issue", "rank",
                              "p_clean", *DESIGN_COLUMNS))
    if p.name in AUDIT_SHEETS:
        check_identity(df, audit_record(p), where=str(p))
    design = _check_design(df, path)
    df = df[df["review"].str.strip() != ""].copy()
    df["review"] = df["review"].str.strip()
    df.attrs["source"] = str(path)
    df.attrs["check_design"] = design.to_dict() if design is not None else None
    return _check_unique(df, str(path))


def _check_design(df: pd.DataFrame, path: str | os.PathLike[str]) -> CheckDesign | None:
    """The check sample's design behind a reviewed file, with its columns added to ``df`` (in place): an audit.csv
    with the audit.json beside it (the design is there), or a reviews CSV from audit.html (it carries the design
    in its columns). None when the file has no check sample."""
    if "stratum" in df.columns:
        return design_from_columns(df)
    record = audit_record(path) if {"rank", "is_noisy", "check"} <= set(df.columns) else {}
    if not record.get("check_sample"):
        return None
    design = CheckDesign.from_dict(record["check_sample"])
    table = df.assign(p_clean=pd.to_numeric(df["p_clean"], errors="coerce") if "p_clean" in df.columns else 0.5,
                      issue=df["issue"] if "issue" in df.columns else "")
    for c, v in design_columns(table, design).items():
        df[c] = v.astype(object).where(v.notna(), "").astype(str)
    return design


def _check_unique(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Drop exact repeats of a decision; two different decisions for one path are an error."""
    if not df["path"].duplicated().any():
        return df
    sugg = df["suggested_label"] if "suggested_label" in df.columns else pd.Series("", index=df.index)
    norm = pd.Series([normalise_review(r, s) for r, s in zip(df["review"], sugg, strict=True)], index=df.index)
    per_path = norm.groupby(df["path"].to_numpy()).nunique()
    bad = per_path[per_path > 1].index.tolist()
    if bad:
        raise DataError(f"{source}: {len(bad)} path(s) have two different decisions ({_listed(bad)}). Keep one "
                        "decision per image.")
    out = df[~df["path"].duplicated()]
    out.attrs.update(df.attrs)
    out.attrs["source"] = source
    return out


def merge_reviews(audit: pd.DataFrame, reviews: pd.DataFrame, *, where: str = "audit") -> pd.DataFrame:
    """The audit with the decisions of ``reviews`` written into its ``review`` column.

    Parameters
    ----------
    audit : DataFrame
        An audit table with ``path`` and ``given_label`` (``suggested_label`` and ``review`` when present).
    reviews : DataFrame
        ``path``, ``review`` and optionally ``given_label``/``suggested_label`` (as from
        :func:`read_reviews`, :func:`reviews_frame` or a hand-off reader); ``attrs["source"]`` names it.
    where : str
        Name of the audit, for messages.

    Returns
    -------
    DataFrame
        A copy of ``audit`` with the decisions in ``review``. A bare ``relabel`` whose suggestion (as the
        reviewer saw it) differs from the audit's is written ``relabel:<that suggestion>``, so it keeps
        its meaning.

    Raises
    ------
    DataError
        A path the audit does not hold, a given label that differs from the audit's, or a decision that
        differs from one already in the audit's ``review`` column; the message names the rows.
    """
    source = str(reviews.attrs.get("source", "reviews"))
    out = audit.copy()
    if "review" not in out.columns:
        out["review"] = ""
    out["review"] = out["review"].astype(object).where(out["review"].notna(), "").astype(str)
    if reviews.empty:
        return out
    pos = pd.Series(np.arange(len(out)), index=out["path"].astype(str).to_numpy())
    if pos.index.duplicated().any():
        dup = pos.index[pos.index.duplicated()].unique().tolist()
        raise DataError(f"{where}: {len(dup)} path(s) appear more than once ({_listed(dup)}), so decisions from "
                        f"{source} cannot be matched to one row. Remove the repeated rows.")
    rpaths = reviews["path"].astype(str)
    known = rpaths.isin(pos.index).to_numpy()
    if not known.all():
        missing = rpaths[~known].tolist()
        raise DataError(f"{source}: {len(missing)} decision(s) for paths not in {where} ({_listed(missing)}). "
                        "The decisions were made on another audit: give the audit they belong to.")
    at = pos.loc[rpaths.to_numpy()].to_numpy()
    rline, aline = line_word(reviews), line_word(out)
    audit_given = out["given_label"].astype(str).to_numpy()[at]
    audit_sugg = _column(out, "suggested_label")[at]
    rsugg = _column(reviews, "suggested_label")
    new = reviews["review"].astype(str).str.strip().to_numpy(dtype=object).copy()
    # the one rule for a decision made on another row: stale decisions are named and left out
    rg, rdig, adig = _column(reviews, "given_label"), _column(reviews, "digest"), _column(out, "digest")[at]
    stale = []
    for i in range(len(at)):
        decided_given = rg[i]
        why = stale_reason(decided_given=decided_given, current_given=audit_given[i],
                           outcome=decision_outcome(new[i], decided_given or audit_given[i],
                                                    rsugg[i] or audit_sugg[i]),
                           decided_digest=rdig[i], current_digest=adig[i])
        if why is not None:
            stale.append((i, f"{rpaths.iloc[i]} ({rline} {reviews.index[i]}: {new[i]!r}): {why}"))
    notes = _foreign_notes(reviews, out, source, where, n_stale=len(stale))
    if stale:
        notes.insert(0, f"{source}: {len(stale)} decision(s) were made on another row than {where}'s and are not "
                        f"used ({_listed([m for _, m in stale])}). Review those rows again.")
        keep = np.ones(len(at), dtype=bool)
        keep[[i for i, _ in stale]] = False
        at, new, audit_sugg, rsugg, rpaths = at[keep], new[keep], audit_sugg[keep], rsugg[keep], rpaths[keep]
        reviews = reviews.loc[keep]
    for i in np.flatnonzero(np.array([v.lower() == "relabel" for v in new], dtype=bool)):
        if rsugg[i] and rsugg[i] != audit_sugg[i]:
            new[i] = f"relabel:{rsugg[i]}"
    old = out["review"].to_numpy(dtype=object)[at]
    clash = []
    for i in np.flatnonzero(np.array([o.strip() != "" for o in old], dtype=bool)):
        if normalise_review(old[i], audit_sugg[i]) != normalise_review(new[i], audit_sugg[i]):
            clash.append(f"{aline} {out.index[at[i]]} ({rpaths.iloc[i]}): {old[i].strip()!r} in {where}, "
                         f"{new[i]!r} in {source} {rline} {reviews.index[i]}")
    if clash:
        raise DataError(f"{len(clash)} decision(s) in {source} differ from the review already in {where} "
                        f"({_listed(clash)}). A decision is never overwritten: clear one of the two and run again.")
    col = out.columns.get_loc("review")
    out.iloc[at, col] = new
    for note in notes:
        warn(note)
    out.attrs["stale_decisions"] = int(audit.attrs.get("stale_decisions", 0)) + len(stale)
    return out


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A text column as an object array ("" for missing values or an absent column)."""
    if name not in frame.columns:
        return np.full(len(frame), "", dtype=object)
    col = frame[name]
    return col.astype(object).where(col.notna(), "").astype(str).to_numpy(dtype=object)


def _foreign_notes(reviews: pd.DataFrame, audit: pd.DataFrame, source: str, where: str, *, n_stale: int) -> list[str]:
    """A note when decisions made on another audit are applied: checked by image where both carry digests, else
    said to be unchecked."""
    theirs = sorted({a for a in _column(reviews, "audit_id") if a})
    ours = sorted({a for a in _column(audit, "audit_id") if a})
    if not theirs or not ours or theirs == ours:
        return []
    unchecked = int(((_column(reviews, "digest") == "")).sum()) if "digest" in audit.columns else len(reviews)
    if unchecked:
        return [f"{source}: decisions made on audit {', '.join(theirs)} are applied to {where} (audit "
                f"{', '.join(ours)}); {unchecked} of them carry no image digest and could not be checked to be about "
                "the same pictures."]
    return []
