"""Measuring a detector against known true labels.

Noisy (wrongly labelled) samples are the positive class: precision, recall and F1 are those of the
``is_noisy`` flag, and AUROC/AUPRC those of the score ``1 - p_clean``. The papers' clean-selection
metrics are reported too, with the *kept* (unflagged) samples as the selection: ``clean_precision`` is
the fraction truly clean among the kept samples, ``clean_recall`` the fraction kept among the truly
clean ones.

A metric that is undefined on the data (for example precision when nothing is flagged, or AUROC when
every label is right) is ``None``, never NaN, so the result is valid JSON.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from labelsieve.audit.auditset import open_audit
from labelsieve.audit.schema import flagged_mask
from labelsieve.core.errors import DataError, check_param
from labelsieve.core.io import restore_frame, sniff_delimiter

__all__ = ["calibration_error", "detection_metrics", "evaluate_audit", "format_metrics"]

_MAX_LISTED = 5


def _bool_vector(name: str, x: object, n: int | None) -> np.ndarray:
    arr = np.asarray(x)
    ok_dtype = arr.dtype == bool or (np.issubdtype(arr.dtype, np.number) and bool(np.all((arr == 0) | (arr == 1))))
    check_param("detection_metrics", name, f"array of shape {arr.shape} and dtype {arr.dtype}",
                arr.ndim == 1 and (n is None or arr.shape[0] == n) and ok_dtype,
                "a bool (or 0/1) array of shape (n,)" + (f" with n = {n}" if n is not None else ""))
    return arr.astype(bool)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def detection_metrics(true_noisy: np.ndarray, p_clean: np.ndarray, is_noisy: np.ndarray) -> dict[str, Any]:
    """Detection quality of a result against the truth.

    Parameters
    ----------
    true_noisy : bool array-like of shape (n,)
        True where the given label is wrong.
    p_clean : array-like of shape (n,), in [0, 1]
        The detector's probability that the given label is right.
    is_noisy : bool array-like of shape (n,)
        The detector's flag.

    Returns
    -------
    dict
        ``n``, ``n_noisy_true``, ``noise_rate_true``, ``n_flagged``; ``precision``, ``recall``, ``f1`` of
        the flag (noisy = positive); ``auroc`` and ``auprc`` of ``1 - p_clean`` (sklearn
        ``roc_auc_score`` / ``average_precision_score``); ``clean_precision`` and ``clean_recall`` of
        the kept samples. Counts are ints, metrics floats or ``None`` where undefined (nothing
        flagged, no noisy or no clean sample, ...). ``f1 = 2 TP / (n_flagged + n_noisy_true)``, which
        is 0.0 when nothing is flagged but some labels are wrong.
    """
    truth = _bool_vector("true_noisy", true_noisy, None)
    n = truth.size
    check_param("detection_metrics", "true_noisy", "an empty array", n > 0, "a non-empty array")
    flag = _bool_vector("is_noisy", is_noisy, n)
    p = np.asarray(p_clean, dtype=np.float64)
    check_param("detection_metrics", "p_clean", f"array of shape {p.shape}",
                p.shape == (n,) and bool(np.all(np.isfinite(p) & (p >= 0) & (p <= 1))),
                f"an array of shape ({n},) of probabilities in [0, 1]")
    n_noisy = int(truth.sum())
    n_flagged = int(flag.sum())
    tp = int((flag & truth).sum())
    kept_clean = int((~flag & ~truth).sum())
    both = 0 < n_noisy < n
    score = -p  # ranks as 1 − p does, without rounding p < 1e-16 to a tie at 1.0
    return {
        "n": int(n),
        "n_noisy_true": n_noisy,
        "noise_rate_true": n_noisy / n,
        "n_flagged": n_flagged,
        "precision": _ratio(tp, n_flagged),
        "recall": _ratio(tp, n_noisy),
        "f1": _ratio(2 * tp, n_flagged + n_noisy),
        "auroc": float(roc_auc_score(truth, score)) if both else None,
        "auprc": float(average_precision_score(truth, score)) if both else None,
        "clean_precision": _ratio(kept_clean, n - n_flagged),
        "clean_recall": _ratio(kept_clean, n - n_noisy),
        "expected_noise_rate": float(1.0 - p.mean()),
        "ece": calibration_error(truth, p),
    }


def calibration_error(true_noisy: np.ndarray, p_clean: np.ndarray, *, bins: int = 10) -> float:
    """Expected calibration error of ``p_clean`` against the truth: the mean over ``bins`` equal-width bins of
    p_clean of |mean p_clean − share clean|, weighted by the share of samples in the bin.

    0 when p_clean is a probability (of every 100 samples at 0.7, 70 are clean); a detector whose score only
    ranks can have a large one with a perfect AUROC.
    """
    clean = ~np.asarray(true_noisy, dtype=bool)
    p = np.asarray(p_clean, dtype=np.float64)
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = np.bincount(idx, minlength=bins).astype(np.float64)
    gap = np.abs(np.bincount(idx, weights=p, minlength=bins) - np.bincount(idx, weights=clean, minlength=bins))
    return float(gap.sum() / max(total.sum(), 1.0))


# --------------------------------------------------------------------------- files


def _listed(items: list[str]) -> str:
    return ", ".join(items[:_MAX_LISTED]) + (" …" if len(items) > _MAX_LISTED else "")


def _read_truth(path: Path, label_column: str) -> pd.DataFrame:
    """The truth CSV: ``path`` and ``label_column`` (and ``label`` when present), as text, by line."""
    if not path.is_file():
        raise DataError(f"Truth file not found: {path}.")
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{path}: the truth file is empty.")
    df = pd.read_csv(path, sep=sniff_delimiter(text[:8192]), dtype=str, keep_default_na=False,
                     encoding="utf-8-sig")
    df.columns = [str(c).strip() for c in df.columns]
    restore_frame(df)
    missing = [c for c in ("path", label_column) if c not in df.columns]
    if missing:
        raise DataError(f"{path}: no column {', '.join(repr(m) for m in missing)} in the header {list(df.columns)}; "
                        f"the truth file needs the columns path, {label_column}.")
    dup = df["path"][df["path"].duplicated()].tolist()
    if dup:
        raise DataError(f"{path}: {len(dup)} path(s) appear more than once ({_listed(dup)}).")
    return df.set_index("path")


def evaluate_audit(
    audit_csv: str | os.PathLike[str],
    truth_csv: str | os.PathLike[str],
    *,
    truth_label_column: str = "true_label",
) -> dict[str, Any]:
    """Detection metrics of an ``audit.csv`` against a CSV of true labels.

    The two files are joined on ``path``. A sample is truly noisy iff the audit's ``given_label``
    differs from the truth file's ``truth_label_column``. Audit rows with ``issue == "unreadable"``
    have no score; they are left out and counted in ``n_unreadable``. The audit is read by the one
    audit reader (:func:`labelsieve.audit.auditset.open_audit`: its identity and labels checked), so a
    file a spreadsheet saved back (``;``-separated, ``TRUE``/``1.0`` flags, a BOM) reads as ``apply`` reads it.

    Parameters
    ----------
    audit_csv : path
        An audit with the columns ``path``, ``given_label``, ``p_clean``, ``is_noisy`` and, optionally,
        ``issue``.
    truth_csv : path
        A CSV with ``path`` and ``truth_label_column`` (for example the output of
        :func:`labelsieve.data.noise.write_noisy_csv`, whose ``label`` column is the noisy label).
    truth_label_column : str, default "true_label"

    Returns
    -------
    dict
        :func:`detection_metrics` of the scored rows, plus ``n_unreadable`` (audit rows left out),
        ``n_truth_not_in_audit`` (truth rows the audit does not cover) and, when the truth file has a
        ``label`` column, ``n_given_label_mismatch`` (rows whose audited ``given_label`` differs from
        it: the audit was run on other labels than the truth file's).

    Raises
    ------
    DataError
        A file or column is missing, a path is repeated, a value cannot be read, or the audit has
        paths the truth file does not (named in the message).
    """
    apath, tpath = Path(audit_csv), Path(truth_csv)
    check_param("evaluate_audit", "truth_label_column", truth_label_column,
                isinstance(truth_label_column, str) and bool(truth_label_column), "a column name")
    audit, _ = open_audit(apath, required=("path", "given_label", "p_clean", "is_noisy"), optional=("issue",))
    truth = _read_truth(tpath, truth_label_column)
    paths = audit["path"]  # paths are data: compared byte for byte
    dup = paths[paths.duplicated()].tolist()
    if dup:
        raise DataError(f"{apath}: {len(dup)} path(s) appear more than once ({_listed(dup)}).")
    not_in_truth = paths[~paths.isin(truth.index)].tolist()
    if not_in_truth:
        n_missing = int((~truth.index.isin(paths)).sum())
        raise DataError(
            f"{apath}: {len(not_in_truth)} path(s) are not in the truth file {tpath} ({_listed(not_in_truth)}); "
            f"{n_missing} truth path(s) are not in the audit. Evaluate the audit against the truth file of the same "
            "images."
        )
    issue = audit["issue"].str.strip().str.lower() if "issue" in audit.columns else pd.Series("", index=audit.index)
    unreadable = (issue == "unreadable").to_numpy()
    scored = audit.loc[~unreadable]
    if scored.empty:
        raise DataError(f"{apath}: no scored rows to evaluate ({int(unreadable.sum())} unreadable).")
    p = pd.to_numeric(scored["p_clean"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(p) & (p >= 0.0) & (p <= 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{apath}, line {scored.index[i]}: p_clean {scored['p_clean'].iloc[i]!r} is not a probability "
                        "in [0, 1].")
    flags = flagged_mask(scored, where=str(apath))
    given = scored["given_label"].to_numpy(dtype=object)
    keys = paths.loc[scored.index]
    true_label = truth.loc[keys, truth_label_column].to_numpy(dtype=object)
    out = detection_metrics(given != true_label, p, flags)
    out["n_unreadable"] = int(unreadable.sum())
    out["n_truth_not_in_audit"] = int((~truth.index.isin(paths)).sum())
    if "label" in truth.columns and truth_label_column != "label":
        out["n_given_label_mismatch"] = int((truth.loc[keys, "label"].to_numpy(dtype=object)
                                             != given).sum())
    return out


# --------------------------------------------------------------------------- text


_LABELS = {
    "n": "samples scored",
    "n_noisy_true": "truly noisy",
    "noise_rate_true": "true noise rate",
    "n_flagged": "flagged noisy",
    "precision": "precision (noisy)",
    "recall": "recall (noisy)",
    "f1": "F1 (noisy)",
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "clean_precision": "clean precision",
    "clean_recall": "clean recall",
    "expected_noise_rate": "mean of 1 - p_clean",
    "ece": "calibration error (ECE)",
    "n_unreadable": "unreadable (left out)",
    "n_truth_not_in_audit": "truth rows not audited",
    "n_given_label_mismatch": "given label != truth file label",
}


def format_metrics(d: dict[str, Any]) -> str:
    """A short two-column text table of a metrics dict (known keys first, in a fixed order).

    Parameters
    ----------
    d : dict
        As returned by :func:`detection_metrics` or :func:`evaluate_audit`.

    Returns
    -------
    str
        One ``label  value`` line per key: ints as ints, rates as ``0.123``, ``None`` as ``n/a``,
        the true noise rate also as a percentage.
    """
    check_param("format_metrics", "d", type(d).__name__, isinstance(d, dict), "a dict of metrics")
    keys = [k for k in _LABELS if k in d] + [k for k in d if k not in _LABELS]
    rows: list[tuple[str, str]] = []
    for k in keys:
        v = d[k]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            text = "n/a"
        elif isinstance(v, (bool, np.bool_)):
            text = str(bool(v))
        elif isinstance(v, (int, np.integer)):
            text = f"{int(v):,}"
        elif isinstance(v, (float, np.floating)):
            text = f"{float(v):.3f}" + (f" ({float(v):.1%})" if k == "noise_rate_true" else "")
        else:
            text = str(v)
        rows.append((_LABELS.get(k, k), text))
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in rows)
