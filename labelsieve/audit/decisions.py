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

Merging never drops or overrides a decision silently: a path the audit does not hold, a given label
that differs from the audit's (the decision was made on other labels), or a decision that differs
from one already in the audit's ``review`` column is an error naming the rows.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from labelsieve.audit.checksample import DESIGN_COLUMNS, CheckDesign, design_columns, design_from_columns
from labelsieve.audit.schema import audit_record, line_word, read_audit
from labelsieve.core.errors import DataError

__all__ = ["REVIEWS_COLUMNS", "merge_reviews", "normalise_review", "read_reviews", "reviews_frame"]

#: Columns of a reviews CSV, in order.
REVIEWS_COLUMNS = ("path", "given_label", "suggested_label", "review")
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


def reviews_frame(paths: list[str], reviews: list[str], *, source: str, given: list[str] | None = None,
                  suggested: list[str] | None = None) -> pd.DataFrame:
    """A reviews table (``path, review`` and optional ``given_label``/``suggested_label``) named ``source``.

    Rows with an empty review are left out; the table's ``attrs["source"]`` names it in messages.
    """
    data: dict[str, list[str]] = {"path": [str(p) for p in paths], "review": [str(r).strip() for r in reviews]}
    if given is not None:
        data["given_label"] = [str(g) for g in given]
    if suggested is not None:
        data["suggested_label"] = [str(s) for s in suggested]
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
        ``path``, ``review`` and, when present, ``given_label`` and ``suggested_label``, for the rows
        with a non-empty review; indexed by CSV line; ``attrs["source"]`` is the file name.

    Raises
    ------
    DataError
        The file cannot be read, has no ``path`` or ``review`` column, or gives one path two different
        decisions.
    """
    df = read_audit(path, required=("path", "review"),
                    optional=("given_label", "suggested_label", "is_noisy", "issue", "rank", "p_clean",
                              *DESIGN_COLUMNS))
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
    if "given_label" in reviews.columns:
        rg = reviews["given_label"].astype(str).to_numpy()
        diff = np.flatnonzero((rg != "") & (rg != audit_given))
        if len(diff):
            shown = [f"{rpaths.iloc[i]}: {rg[i]!r} there, {audit_given[i]!r} in the audit" for i in diff]
            raise DataError(f"{source}: {len(diff)} decision(s) were made on another given label than {where}'s "
                            f"({_listed(shown)}). Review this audit's labels, or give the audit the decisions were "
                            "made on.")
    audit_sugg = (out["suggested_label"].astype(object).where(out["suggested_label"].notna(), "").astype(str)
                  .to_numpy()[at] if "suggested_label" in out.columns else np.full(len(at), "", dtype=object))
    rsugg = (reviews["suggested_label"].astype(str).to_numpy() if "suggested_label" in reviews.columns
             else np.full(len(at), "", dtype=object))
    new = reviews["review"].astype(str).str.strip().to_numpy(dtype=object).copy()
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
    return out
