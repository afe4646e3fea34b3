"""The audit table: one row per input row, most suspicious first.

Built from the input rows, the feature store's decode results and a detector's
:class:`~labelsieve.detectors.common.base.DetectionResult`. Columns (DESIGN.md §1)::

    path, given_label, p_clean, is_noisy, suggested_label, suggested_prob, issue, rank, review, check

plus ``duplicate_of``, ``duplicate_group`` and any per-detector columns the detector adds
(``p_clean_<member>``).

``check`` holds the review order 1 … K of the rows in the audit's check sample (a random, stratified sample;
:mod:`labelsieve.audit.checksample`), empty elsewhere; it is drawn once the ranks are final.

``duplicate_of`` names the first earlier row with byte-identical content. ``duplicate_group`` numbers the
near-duplicate groups (the same picture resized, re-encoded or cropped;
:mod:`labelsieve.detectors.common.duplicates`) 1, 2, … in the order a reviewer meets them in the table,
empty for rows in no group. A group whose rows carry different given labels is a *label conflict*: the
same picture with two labels, so at least one of them is wrong.

``issue`` is, in order of precedence:

* ``unreadable`` — the file could not be decoded (p_clean and suggestions empty, always flagged);
* ``outlier`` — flagged, and no class is likely either (``suggested_prob < outlier_prob``);
* ``label`` — flagged: the given label is probably wrong;
* ``duplicate`` — not flagged, but byte-identical to an earlier row (``duplicate_of`` names it) or in a
  near-duplicate group;
* empty otherwise.

``rank``: unreadable rows first; then the rows of label-conflict groups (a group's rows together, groups by
their lowest p_clean); then the other flagged rows by ascending p_clean, then the rest by ascending
p_clean; ties go by the raw score (``p_clean_raw``, when the detector's result was calibrated), then input
order — so the ranking is the detector's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labelsieve.core.defaults import DEFAULT_OUTLIER_PROB
from labelsieve.data import LabeledImages
from labelsieve.detectors.common.base import DetectionResult


@dataclass
class Audit:
    """An audit: the table and its summary (what audit.json holds)."""

    table: pd.DataFrame
    summary: dict[str, Any]
    out_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def flagged(self) -> pd.DataFrame:
        return self.table[self.table["is_noisy"]]


def duplicate_of(paths: list[str], digests: list[bytes]) -> list[str]:
    """For each row, the path of the first earlier row with identical bytes, else ''."""
    first: dict[bytes, str] = {}
    out = []
    for p, d in zip(paths, digests, strict=True):
        if d in first:
            out.append(first[d])
        else:
            first[d] = p
            out.append("")
    return out


def build_table(
    images: LabeledImages,
    readable: np.ndarray,
    result: DetectionResult,
    *,
    digests: list[bytes] | None = None,
    outlier_prob: float = DEFAULT_OUTLIER_PROB,
    duplicate_groups: np.ndarray | None = None,
) -> pd.DataFrame:
    """The audit table for ``images`` given the detector's result on the ``readable`` rows.

    Parameters
    ----------
    images : LabeledImages
        All input rows.
    readable : ndarray of shape (n,), bool
        Which rows decoded; ``result`` covers exactly those, in order.
    result : DetectionResult
    digests : list of bytes, optional
        Content digests per row, for the duplicate check.
    outlier_prob : float
        Flagged rows whose best class is less likely than this are ``outlier`` rows.
    duplicate_groups : ndarray of shape (n_readable,), int, optional
        Near-duplicate group of each readable row (``-1``: none), as
        :func:`~labelsieve.detectors.common.duplicates.near_duplicate_groups` returns them.
    """
    n = len(images)
    ridx = np.nonzero(readable)[0]
    if len(ridx) != len(result.p_clean):
        raise ValueError(f"result covers {len(result.p_clean)} rows but {len(ridx)} are readable")
    p_clean = np.full(n, np.nan)
    p_clean[ridx] = result.p_clean
    flagged = np.ones(n, dtype=bool)
    flagged[ridx] = result.is_noisy
    sugg = np.full(n, "", dtype=object)
    sugg[ridx] = [images.classes[int(c)] for c in result.suggested]
    sprob = np.full(n, np.nan)
    sprob[ridx] = result.suggested_prob
    dup = duplicate_of(images.paths, digests) if digests is not None else [""] * n
    group = np.full(n, -1, dtype=np.int64)
    if duplicate_groups is not None:
        group[ridx] = duplicate_groups
    conflict = conflict_mask(group, images.labels)
    issue = np.full(n, "", dtype=object)
    issue[[bool(d) for d in dup]] = "duplicate"
    issue[group >= 0] = "duplicate"
    issue[flagged] = "label"
    issue[flagged & (np.nan_to_num(sprob, nan=1.0) < outlier_prob)] = "outlier"
    issue[~readable] = "unreadable"
    table = pd.DataFrame({
        "path": images.paths,
        "given_label": images.label_names(),
        "p_clean": p_clean,
        "is_noisy": flagged,
        "suggested_label": sugg,
        "suggested_prob": sprob,
        "issue": issue,
        "rank": 0,
        "review": "",
        "check": pd.array([pd.NA] * n, dtype="Int64"),  # the check sample's review order (api.finish_table)
        "duplicate_of": dup,
        "duplicate_group": group,
    })
    for name, col in result.columns.items():
        full = np.full(n, np.nan)
        full[ridx] = col
        table[name] = full
    p_sort = np.nan_to_num(p_clean, nan=-1.0)
    block = np.where(~readable, 0, np.where(conflict, 1, np.where(flagged, 2, 3)))
    # conflict groups stay together, the group with the lowest p_clean first
    group_min = pd.Series(p_sort[conflict]).groupby(group[conflict]).min()
    group_rank = {int(g): r for r, g in enumerate(group_min.sort_values(kind="stable").index)}
    by_group = np.zeros(n, dtype=np.int64)
    by_group[conflict] = [group_rank[int(g)] for g in group[conflict]]
    # ties of (calibrated) p_clean keep the detector's raw order, then the input order
    raw = np.nan_to_num(table["p_clean_raw"].to_numpy(dtype=np.float64), nan=-1.0) if "p_clean_raw" in table \
        else np.zeros(n)
    order = np.lexsort((np.arange(n), raw, p_sort, by_group, block))
    table = table.iloc[order].reset_index(drop=True)
    table["rank"] = np.arange(1, n + 1)
    table["duplicate_group"] = _renumber(table["duplicate_group"].to_numpy())
    return table


def conflict_mask(group: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rows whose near-duplicate group (``group >= 0``) holds more than one given label."""
    out = np.zeros(len(group), dtype=bool)
    member = group >= 0
    if member.any():
        n_labels = pd.Series(labels[member]).groupby(group[member]).transform("nunique").to_numpy()
        out[member] = n_labels > 1
    return out


def _renumber(group: np.ndarray) -> pd.Series:
    """Group ids 1, 2, … in order of first appearance; rows in no group are empty (nullable integers)."""
    _, first = np.unique(group[group >= 0], return_index=True)
    number = {int(g): i + 1 for i, g in enumerate(group[group >= 0][np.sort(first)])}
    return pd.Series([number.get(int(g)) if g >= 0 else None for g in group], dtype="Int64")


def near_duplicate_summary(table: pd.DataFrame) -> dict[str, int]:
    """Counts of near-duplicate groups: all, with conflicting labels, spanning top-level folders."""
    g = table[table["duplicate_group"].notna()]
    if g.empty:
        return {"n_groups": 0, "n_rows": 0, "n_conflicting_groups": 0, "n_rows_conflicting": 0,
                "n_groups_across_folders": 0}
    by = g.groupby("duplicate_group")
    n_labels = by["given_label"].nunique()
    top = g["path"].map(lambda p: Path(p).parts[0] if len(Path(p).parts) > 1 else "")
    n_folders = top.groupby(g["duplicate_group"]).nunique()
    conflicting = n_labels[n_labels > 1].index
    return {"n_groups": int(len(n_labels)), "n_rows": int(len(g)),
            "n_conflicting_groups": int(len(conflicting)),
            "n_rows_conflicting": int(g["duplicate_group"].isin(conflicting).sum()),
            "n_groups_across_folders": int((n_folders > 1).sum())}


#: What the model-based interval covers, said wherever it is shown (it held the truth on only some benchmark sets:
#: docs/benchmarks.md, "How right the audit is").
MODEL_INTERVAL_COVERS = ("the mixture's fit and chance only, not a model that misreads the data; review the check "
                         "sample for an interval that holds whatever the model")


def use_estimate(summary: dict[str, Any], estimate: dict[str, Any]) -> None:
    """Make the design-based estimate from reviewed rows (:func:`labelsieve.audit.estimate.estimate_from_reviews`)
    the audit's noise estimate, in place: ``noise_rate``, ``noise_rate_interval`` (95 %) and
    ``noise_rate_basis`` = "reviewed sample"; the model's own stay in ``model_noise_rate`` and
    ``model_noise_rate_interval``, and the whole estimate (with the flags' precision and recall) in
    ``reviewed_estimate``. The per-class rates stay the model's (``noise_rate_per_class_basis``)."""
    summary["noise_rate"] = float(estimate["rate"])
    summary["noise_rate_interval"] = [float(v) for v in estimate["interval"]]
    summary["noise_rate_interval_level"] = float(estimate["level"])
    summary["noise_rate_basis"] = "reviewed sample"
    summary["noise_rate_interval_covers"] = ("the share of wrong labels in the whole data set, whatever the model: "
                                             "a design-based interval from the reviewed check sample")
    summary["noise_rate_per_class_basis"] = "model"
    summary["reviewed_estimate"] = estimate
def _by_threshold(result: DetectionResult) -> bool:
    """Whether the flags are ``p_clean < threshold`` (False for a detector's own set decision)."""
    return (result.info or {}).get("decision", "threshold" if result.flags is None else "flags") == "threshold"


def summarise(table: pd.DataFrame, images: LabeledImages, result: DetectionResult) -> dict[str, Any]:
    """Counts and the noise estimate for audit.json (the caller adds method, model, timings …).

    ``noise_rate`` (with ``noise_rate_interval``) and ``noise_rate_per_class`` (with
    ``noise_rate_per_class_interval``) are *the* estimate of the share of wrong labels: the mean of
    1 − calibrated p_clean over the readable rows (overall and per given class), with the bootstrap
    interval of :func:`labelsieve.detectors.common.calibration.noise_estimate` when the result carries one.
    ``flag_rate`` and ``flag_rate_per_class`` are the share of readable rows flagged (the decision), a
    different number: how many rows the audit asks a person to look at.
    """
    readable = table["issue"] != "unreadable"
    r = table[readable]
    per_class_flagged = r.groupby("given_label")["is_noisy"].mean()
    per_class_expected = (1.0 - r.groupby("given_label")["p_clean"].mean())
    counts = table["issue"].replace("", "none").value_counts().to_dict()
    est = ((result.info or {}).get("calibration") or {}).get("noise_estimate")
    rate = float(1.0 - r["p_clean"].mean()) if len(r) else 0.0
    per_class = {c: float(per_class_expected.get(c, 0.0)) for c in images.classes}
    interval = [rate, rate]
    per_class_interval = {c: [v, v] for c, v in per_class.items()}
    if est is not None:
        interval = [float(v) for v in est["interval"]]
        per_class_interval = {c: [float(v) for v in est["per_class_interval"][i]]
                              for i, c in enumerate(images.classes)}
    return {
        "n_images": int(len(table)),
        "n_readable": int(readable.sum()),
        "n_unreadable": int((~readable).sum()),
        "n_flagged": int(r["is_noisy"].sum()),
        "n_duplicates": int((table["duplicate_of"] != "").sum()),
        "near_duplicates": near_duplicate_summary(table),
        "issues": {str(k): int(v) for k, v in counts.items()},
        # a detector whose decision is not a threshold on p_clean (confident learning) shows no threshold
        "threshold": float(result.threshold) if _by_threshold(result) else None,
        "decision": ("p_clean < threshold" if _by_threshold(result)
                     else "the detector's own decision, not a threshold on p_clean (see decision_rule)"),
        "decision_rule": result.rule,
        "noise_rate": rate,
        "noise_rate_interval": interval,
        "noise_rate_interval_level": float(est["level"]) if est is not None else None,
        "noise_rate_basis": "model",
        "noise_rate_interval_covers": MODEL_INTERVAL_COVERS,
        # the model's own, label-free estimate (calibration.noise_estimate), which neither reviewed rows nor a
        # recalibration on them change
        "model_noise_rate": float(est["rate"]) if est is not None else rate,
        "model_noise_rate_interval": interval,
        "noise_rate_per_class": per_class,
        "noise_rate_per_class_interval": per_class_interval,
        "flag_rate": float(r["is_noisy"].mean()) if len(r) else 0.0,
        "flag_rate_per_class": {c: float(per_class_flagged.get(c, 0.0)) for c in images.classes},
        "classes": list(images.classes),
        "classnames": list(images.classnames),
        "warnings": [str(w) for w in (result.info or {}).get("warnings", [])],
        "class_counts": {c: int(v) for c, v in zip(images.classes, np.bincount(images.labels,
                                                                               minlength=images.n_classes),
                                                    strict=True)},
    }
