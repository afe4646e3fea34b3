"""The audit table: one row per input row, most suspicious first.

Built from the input rows, the feature store's decode results and a detector's
:class:`~labelsieve.detectors.common.base.DetectionResult`. Columns (DESIGN.md §1)::

    path, given_label, p_clean, is_noisy, suggested_label, suggested_prob, issue, rank, review

plus ``duplicate_of`` and any per-detector columns the detector adds (``p_clean_<member>``).

``issue`` is, in order of precedence:

* ``unreadable`` — the file could not be decoded (p_clean and suggestions empty, always flagged);
* ``outlier`` — flagged, and no class is likely either (``suggested_prob < outlier_prob``);
* ``label`` — flagged: the given label is probably wrong;
* ``duplicate`` — not flagged, but byte-identical to an earlier row (``duplicate_of`` names it);
* empty otherwise.

``rank``: unreadable rows first, then flagged rows by ascending p_clean, then the rest by
ascending p_clean; ties keep input order.
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
    issue = np.full(n, "", dtype=object)
    issue[[bool(d) for d in dup]] = "duplicate"
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
        "duplicate_of": dup,
    })
    for name, col in result.columns.items():
        full = np.full(n, np.nan)
        full[ridx] = col
        table[name] = full
    group = np.where(~readable, 0, np.where(flagged, 1, 2))
    order = np.lexsort((np.arange(n), np.nan_to_num(p_clean, nan=-1.0), group))
    table = table.iloc[order].reset_index(drop=True)
    table["rank"] = np.arange(1, n + 1)
    return table


def summarise(table: pd.DataFrame, images: LabeledImages, result: DetectionResult) -> dict[str, Any]:
    """Counts and noise-rate estimates for audit.json (the caller adds method, model, timings …)."""
    readable = table["issue"] != "unreadable"
    r = table[readable]
    per_class_flagged = r.groupby("given_label")["is_noisy"].mean()
    per_class_expected = (1.0 - r.groupby("given_label")["p_clean"].mean())
    counts = table["issue"].replace("", "none").value_counts().to_dict()
    return {
        "n_images": int(len(table)),
        "n_readable": int(readable.sum()),
        "n_unreadable": int((~readable).sum()),
        "n_flagged": int(r["is_noisy"].sum()),
        "n_duplicates": int((table["duplicate_of"] != "").sum()),
        "issues": {str(k): int(v) for k, v in counts.items()},
        "threshold": float(result.threshold),
        "decision_rule": result.rule,
        "noise_rate": float(r["is_noisy"].mean()) if len(r) else 0.0,
        "noise_rate_expected": float(1.0 - r["p_clean"].mean()) if len(r) else 0.0,
        "noise_rate_per_class": {c: float(per_class_flagged.get(c, 0.0)) for c in images.classes},
        "noise_rate_expected_per_class": {c: float(per_class_expected.get(c, 0.0)) for c in images.classes},
        "classes": list(images.classes),
        "classnames": list(images.classnames),
        "warnings": [str(w) for w in (result.info or {}).get("warnings", [])],
        "class_counts": {c: int(v) for c, v in zip(images.classes, np.bincount(images.labels,
                                                                               minlength=images.n_classes),
                                                    strict=True)},
    }
