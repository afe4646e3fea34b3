"""Reviewed rows sharpen the next audit: ``labelsieve audit ... --reviewed FILE``.

A reviewed file is any table of decisions :func:`labelsieve.audit.decisions.read_reviews` reads: an
earlier ``audit.csv`` with its ``review`` column filled, or a reviews CSV downloaded from
``audit.html``. Each decision is read by the one review rule
(:func:`labelsieve.audit.review.kept_rows`) against the audit it was made on (its ``given_label``
and ``suggested_label``), and becomes, for the new audit:

========================  =====================================================================
decision                  in the next audit
========================  =====================================================================
``keep``                  a trusted row with its label
``relabel`` / ``:<c>``    a trusted row with the new label (the detector fits on it)
``drop``                  left out of the detector's fit
========================  =====================================================================

Every detector then fits on the corrected labels (probes, kNN votes, prompts), and the ensemble's
stacking takes the trusted rows as ground truth (``DetectionContext.trusted``). In the new audit
table a reviewed row keeps its decision in ``review`` (written in the new audit's terms:
``keep``, ``relabel:<class>`` or ``drop``, so ``apply`` gives the same label even where the new
suggestion differs), gets ``issue = "reviewed"`` and a ``p_clean`` that reports the review (1 for a
kept label, 0 for a relabelled or dropped one; ``suggested_label`` is the reviewer's label), and
ranks after every row still to review. Decisions for paths the new input does not hold are not
lost silently: they are counted and listed in ``audit.json`` (``reviewed``) and in a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from labelsieve.audit.auditset import format_digest
from labelsieve.audit.checksample import REVIEWED_ISSUE, CheckDesign
from labelsieve.audit.decisions import stale_reason
from labelsieve.audit.estimate import (
    Recalibration,
    estimate_from_reviews,
    exact_rows,
    fit_recalibration,
    sample_from_frame,
)
from labelsieve.audit.review import kept_rows
from labelsieve.core.errors import DataError
from labelsieve.data import LabeledImages
from labelsieve.detectors.common.base import DetectionResult
from labelsieve.detectors.common.calibration import with_raw_order

__all__ = ["REVIEWED_ISSUE", "ReviewedRows", "check_reviewed_frames", "mark_reviewed", "resolve_reviewed",
           "recalibrated", "reviewed_estimate", "reviewed_warning", "widen_result"]

_MAX_LISTED = 20


@dataclass
class ReviewedRows:
    """Earlier decisions mapped onto the rows of a new input.

    Attributes
    ----------
    labels : ndarray of shape (n,), int64
        Corrected label per input row (the given label where nobody decided, and for dropped rows).
    trusted : ndarray of shape (n,), bool
        Rows kept or relabelled by a reviewer.
    dropped : ndarray of shape (n,), bool
        Rows a reviewer dropped.
    held_out : ndarray of shape (n,), bool
        Rows of an earlier audit's check sample that a reviewer decided, outside the bands' top runs (rows decided
        from the top of a band count exactly and are trusted like any): the new audit's yardstick. The detector
        sees them as any undecided row (given label, not trusted), so that their scores in the new audit are
        honest: the new audit's p_clean is recalibrated on them. None are held out when the sample is more than
        :data:`HOLD_OUT_MAX_SHARE` of the rows it was drawn from.
    review : ndarray of shape (n,), object
        The decision to write in the new audit's ``review`` column ("" where none).
    sources : list of str
        The files the decisions came from.
    not_in_input : list of str
        Paths with a decision that the new input does not hold.
    stale : list of str
        Decisions not used because they were made on another row (another given label they do not agree
        with, another picture), each with its reason.
    """

    labels: np.ndarray
    trusted: np.ndarray
    dropped: np.ndarray
    review: np.ndarray
    sources: list[str] = field(default_factory=list)
    not_in_input: list[str] = field(default_factory=list)
    held_out: np.ndarray | None = None
    wrong: np.ndarray | None = None
    design_frames: list[pd.DataFrame] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.held_out is None:
            self.held_out = np.zeros(len(self.labels), dtype=bool)
    stale: list[str] = field(default_factory=list)

    @property
    def decided(self) -> np.ndarray:
        return self.trusted | self.dropped | self.held_out

    def describe(self) -> dict:
        """What audit.json records under ``reviewed``."""
        n_relabel = int(np.char.startswith(self.review.astype(str), "relabel:").sum())
        n_relabel -= int(np.char.startswith(self.review[self.held_out].astype(str), "relabel:").sum())
        return {"files": self.sources, "n_decided": int(self.decided.sum()), "n_trusted": int(self.trusted.sum()),
                "n_kept": int(self.trusted.sum()) - n_relabel, "n_relabelled": n_relabel,
                "n_dropped": int(self.dropped.sum()), "n_check_held_out": int(self.held_out.sum()),
                "n_not_in_input": len(self.not_in_input), "not_in_input": self.not_in_input[:_MAX_LISTED],
                "n_stale": len(self.stale), "stale": self.stale[:_MAX_LISTED]}


def resolve_reviewed(images: LabeledImages, reviews: Sequence[pd.DataFrame], *,
                     digests: Sequence[bytes] | None = None) -> ReviewedRows:
    """Map decisions (tables from :func:`~labelsieve.audit.decisions.read_reviews`) onto ``images``.

    A decision made on another row than the input's (another given label it does not agree with, or another
    picture: ``digests`` are the input images' content digests) is stale: not used, and listed
    (:func:`labelsieve.audit.decisions.stale_reason`, the rule ``apply --reviews`` follows too).

    Raises
    ------
    DataError
        An unknown review value or class (as ``labelsieve apply`` would say), or two files giving one
        image different outcomes.
    """
    n = len(images)
    pos = {p: i for i, p in enumerate(images.paths)}
    given = np.asarray(images.label_names(), dtype=object)
    current_digest = ([format_digest(d) for d in digests] if digests is not None else [""] * n)
    outcome = np.full(n, None, dtype=object)  # class name, or "" for drop
    origin = np.full(n, "", dtype=object)
    design_frames: list[pd.DataFrame] = []
    not_in: list[str] = []
    stale: list[str] = []
    sources: list[str] = []
    for frame in reviews:
        source = str(frame.attrs.get("source", "reviews"))
        sources.append(source)
        inside = frame["path"].astype(str).isin(pos)
        not_in += [p for p in frame.loc[~inside, "path"].astype(str) if p not in not_in]
        f = frame.loc[inside].copy()
        if f.empty:
            continue
        at = np.array([pos[p] for p in f["path"].astype(str)], dtype=np.int64)
        g = f["given_label"].astype(str).to_numpy(dtype=object) if "given_label" in f.columns else given[at]
        f["given_label"] = np.where(g == "", given[at], g)
        if "suggested_label" not in f.columns:
            f["suggested_label"] = ""
        f["is_noisy"] = False
        kept = kept_rows(f[["path", "given_label", "suggested_label", "is_noisy", "review"]],
                         classes=sorted({*images.classes, *f["given_label"].astype(str)}), source=source)
        label_of = dict(zip(kept["path"], kept["label"], strict=True))
        new = np.array([label_of.get(p, "") for p in f["path"].astype(str)], dtype=object)
        decided_digest = (f["digest"].astype(str).to_numpy(dtype=object) if "digest" in f.columns
                          else np.full(len(f), "", dtype=object))
        fresh = np.ones(len(f), dtype=bool)
        for k, i in enumerate(at):
            why = stale_reason(decided_given=str(f["given_label"].iloc[k]), current_given=str(given[i]),
                               outcome=str(new[k]), decided_digest=str(decided_digest[k]),
                               current_digest=current_digest[i])
            if why is None and new[k] and new[k] not in images.classes:
                why = f"it gives the class {new[k]!r}, which this input does not have"
            if why is not None:
                fresh[k] = False
                stale.append(f"{images.paths[i]} ({source}, {f['review'].iloc[k]!r}): {why}")
        f, at, new = f.loc[fresh], at[fresh], new[fresh]
        clash = [f"{images.paths[i]}: {outcome[i] or 'drop'!r} from {origin[i]}, {new[k] or 'drop'!r} from {source}"
                 for k, i in enumerate(at) if outcome[i] is not None and outcome[i] != new[k]]
        if clash:
            shown = "; ".join(clash[:5]) + (" …" if len(clash) > 5 else "")
            raise DataError(f"{len(clash)} image(s) have different decisions in two reviewed files ({shown}). "
                            "Keep one decision per image.")
        outcome[at] = new
        origin[at] = source
        if "check" in f.columns and frame.attrs.get("check_design"):
            g = f.assign(_row=at)
            g.attrs["check_design"] = frame.attrs["check_design"]
            design_frames.append(g)
    decided = np.array([o is not None for o in outcome], dtype=bool)
    held_out = decided & _held_out(design_frames, n)
    wrong = np.full(n, np.nan)
    wrong[decided] = [0.0 if o == g else 1.0 for o, g in zip(outcome[decided], given[decided], strict=True)]
    dropped = decided & ~held_out & np.array([o == "" for o in outcome], dtype=bool)
    trusted = decided & ~held_out & ~dropped
    index = {c: i for i, c in enumerate(images.classes)}
    labels = images.labels.copy()
    labels[trusted] = [index[c] for c in outcome[trusted]]
    review = np.full(n, "", dtype=object)
    review[decided & (outcome == "")] = "drop"
    same = decided & (outcome == given)
    review[same] = "keep"
    changed = decided & ~same & (outcome != "")
    review[changed] = ["relabel:" + str(c) for c in outcome[changed]]
    return ReviewedRows(labels=labels, trusted=trusted, dropped=dropped, review=review, sources=sources,
                        not_in_input=not_in, held_out=held_out, wrong=wrong, design_frames=design_frames,
                        stale=stale)


#: A re-audit holds an earlier audit's check rows out of the detector's trusted rows only when the sample is at most
#: this share of the rows it was drawn from: a sample of most of the data leaves little to calibrate for, and its
#: rows are then worth more as trusted labels.
HOLD_OUT_MAX_SHARE = 0.25


def _pooled(frames: list[pd.DataFrame]) -> tuple[dict | None, pd.DataFrame | None, list[pd.DataFrame], list[str]]:
    """The decisions of the first design among ``frames`` pooled (one row per input row), the frames that carry it,
    and the names of the files with another design."""
    if not frames:
        return None, None, [], []
    design_dict = frames[0].attrs["check_design"]
    same = [f for f in frames if f.attrs["check_design"] == design_dict]
    other = [str(f.attrs.get("source", "reviews")) for f in frames if f.attrs["check_design"] != design_dict]
    return design_dict, pd.concat(same).drop_duplicates(subset="_row", keep="first"), same, other


def _held_out(frames: list[pd.DataFrame], n: int) -> np.ndarray:
    """Input rows that are decided rows of an earlier audit's check sample outside the bands' top runs (those count
    exactly and may be trusted): the random sample a re-audit measures itself on (:class:`ReviewedRows`)."""
    out = np.zeros(n, dtype=bool)
    design_dict, frame, _, _ = _pooled(frames)
    if design_dict is None:
        return out
    design = CheckDesign.from_dict(design_dict)
    if design.population and design.size > HOLD_OUT_MAX_SHARE * design.population:
        return out
    sample, _, _ = sample_from_frame(frame)
    sampled = (sample.check > 0) & np.isfinite(sample.wrong) & ~exact_rows(design, sample)
    out[frame["_row"].to_numpy()[sampled]] = True
    return out


def reviewed_estimate(rows: ReviewedRows, p_clean: np.ndarray,
                      fit_rows: np.ndarray) -> tuple[dict | None, Recalibration | None]:
    """What the decisions on an earlier audit's check sample say (:mod:`labelsieve.audit.estimate`): the
    design-based estimate of wrong labels and of that audit's flags, and the map that recalibrates this audit's
    ``p_clean`` (the detector's calibrated scores of the rows it fitted, ``fit_rows``: their input positions) on the
    held-out check rows. ``(None, None)`` when no reviewed file carries a check sample.

    Files that carry the same design (the audit.csv and reviews CSVs of one audit) are pooled; a file with another
    design is left out of the estimate (its decisions still apply) and named in the estimate's ``left_out``.
    """
    design_dict, frame, same, other = _pooled(rows.design_frames)
    if design_dict is None:
        return None, None
    design = CheckDesign.from_dict(design_dict)
    sample, known_rows, known_wrong = sample_from_frame(frame)
    est = estimate_from_reviews(design, sample, known_rows=known_rows, known_wrong=known_wrong)
    if est is not None:
        est["files"] = sorted({str(f.attrs.get("source", "reviews")) for f in same})
        est["left_out"] = sorted(set(other))
        est["flags_of"] = "the audit the check sample was drawn from (the reviewed file's flags)"
    held = np.nonzero(rows.held_out[fit_rows])[0]
    recal = None
    if len(held) >= 2:
        at = {int(r): k for k, r in enumerate(frame["_row"].to_numpy())}
        strat = frame[["stratum_rows", "stratum_sampled"]].apply(pd.to_numeric, errors="coerce").to_numpy()
        weight = np.array([strat[at[int(r)], 0] / max(strat[at[int(r)], 1], 1.0) for r in fit_rows[held]])
        recal = fit_recalibration(np.asarray(p_clean)[held], rows.wrong[fit_rows[held]], np.nan_to_num(weight, nan=1.0))
    return est, recal


def recalibrated(result: DetectionResult, recal: Recalibration) -> DetectionResult:
    """``result`` with ``p_clean`` mapped through ``recal`` (the ranking and the flags stay the detector's)."""
    raw = result.columns.get("p_clean_raw", result.p_clean)
    result.p_clean = with_raw_order(recal(result.p_clean), raw)
    result.info = {**(result.info or {}), "recalibration": recal.to_dict()}
    result.rule += (f" Then recalibrated on {recal.rows} reviewed check-sample rows: sigma({recal.a:.3g}*ln(p) - "
                    f"{recal.b:.3g}*ln(1-p) + {recal.c:.3g}) (same ranking, same flags).")
    return result


def widen_result(result: DetectionResult, fitted: np.ndarray) -> DetectionResult:
    """A result over the rows of ``fitted`` (bool mask) from one over its True rows; the other rows
    (dropped by a reviewer) get ``p_clean`` 0, uniform ``probs`` and empty extra columns."""
    fitted = np.asarray(fitted, dtype=bool)
    if fitted.all():
        return result
    n, k = len(fitted), result.probs.shape[1]
    p = np.zeros(n)
    p[fitted] = result.p_clean
    probs = np.full((n, k), 1.0 / k)
    probs[fitted] = result.probs
    columns = {}
    for name, col in result.columns.items():
        full = np.full(n, np.nan)
        full[fitted] = col
        columns[name] = full
    flags = None
    if result.flags is not None:
        flags = np.ones(n, dtype=bool)
        flags[fitted] = result.flags
    return DetectionResult(p_clean=p, probs=probs, threshold=result.threshold, rule=result.rule, info=result.info,
                           columns=columns, flags=flags)


def mark_reviewed(table: pd.DataFrame, images: LabeledImages, rows: ReviewedRows) -> pd.DataFrame:
    """The audit table with the reviewed rows reported as reviewed (see the module docstring), re-ranked."""
    pos = {p: i for i, p in enumerate(images.paths)}
    at = np.array([pos[p] for p in table["path"]], dtype=np.int64)
    decided = rows.decided[at]
    if not decided.any():
        return table
    out = table.copy()
    unreadable = (out["issue"] == "unreadable").to_numpy()
    out.loc[decided, "review"] = rows.review[at][decided]
    done = decided & ~unreadable
    review = rows.review[at].astype(str)
    kept_same = done & (review == "keep")
    relabelled = done & np.char.startswith(review, "relabel:")
    final = np.where(kept_same, out["given_label"].to_numpy(dtype=object),
                     np.array([r.split(":", 1)[1] if r.startswith("relabel:") else "" for r in review], dtype=object))
    labelled = kept_same | relabelled
    out.loc[done, "p_clean"] = np.where(kept_same[done], 1.0, 0.0)
    out.loc[done, "is_noisy"] = ~kept_same[done]
    out.loc[labelled, "suggested_label"] = final[labelled]
    out.loc[labelled, "suggested_prob"] = 1.0
    dropped = done & ~labelled
    out.loc[dropped, "suggested_label"] = ""
    out.loc[dropped, "suggested_prob"] = np.nan
    out.loc[done, "issue"] = REVIEWED_ISSUE
    group = np.where(unreadable, 0, np.where(done, 3, np.where(out["is_noisy"].to_numpy(dtype=bool), 1, 2)))
    order = np.lexsort((out["rank"].to_numpy(), group))
    out = out.iloc[order].reset_index(drop=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out


def reviewed_warning(rows: ReviewedRows) -> str | None:
    """A warning for audit.json when decisions name paths the input does not hold, or were made on other rows."""
    parts = []
    if rows.not_in_input:
        shown = ", ".join(rows.not_in_input[:5]) + (" …" if len(rows.not_in_input) > 5 else "")
        parts.append(f"{len(rows.not_in_input)} reviewed decision(s) name paths not in this input ({shown}); they are "
                     "listed in audit.json under 'reviewed' and were not used. Keep the reviewed file to apply them "
                     "later.")
    if rows.stale:
        shown = "; ".join(rows.stale[:5]) + (" …" if len(rows.stale) > 5 else "")
        parts.append(f"{len(rows.stale)} reviewed decision(s) were made on another row than this input's and were not "
                     f"used ({shown}). Review those rows again.")
    return " ".join(parts) or None


def check_reviewed_frames(frames: Sequence[pd.DataFrame]) -> None:
    """Refuse a reviewed file with no decision at all (probably the wrong file)."""
    for f in frames:
        if f.empty:
            raise DataError(f"{f.attrs.get('source', 'reviews')}: no decisions (every review cell is empty). Give "
                            "the reviewed audit.csv or the reviews CSV downloaded from audit.html.")
