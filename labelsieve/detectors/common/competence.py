"""How well the model reads this data, measured on every audit without ground truth.

A detector can only tell a wrong label from a picture the model misreads when the model reads the data well.
Users meet weak models for their data all the time (a new domain, medical or satellite images, a small model on a
laptop), and then the flags and the model-based error rate are unreliable. :func:`measure_competence` says so:

* ``probe_agreement`` — a linear probe on the image features, trained on the rows the detector keeps (3-fold
  cross-validated there; at most :data:`MAX_ROWS` rows measured), agrees with this share of the given labels. It
  mixes two things: wrong labels and rows the features cannot place. (Trained on every row, the probe learns
  systematic wrong labels — pair noise — and then misreads the pictures the same way.);
* ``zero_shot_agreement`` — the zero-shot classifier ("a photo of a {}.") agrees with this share of the given
  labels (vision-language models only);
* ``reader_agreement`` — the probe and the zero-shot classifier agree with *each other* on this share of rows.
  It does not involve the given labels at all, so wrong labels do not lower it: two independent readings of the
  pictures (through the image features, through the class names) agree only where the model reads the data;
* ``separation`` — how far apart, in shared standard deviations, the two populations of the label-free
  calibration's mixture lie (:mod:`~labelsieve.detectors.common.calibration`): below 2 the scores of right and
  wrong labels overlap much. (A stacked ensemble's scores are bimodal on every benchmark set, 14–30 standard
  deviations apart even where its flags are poor, so this rarely decides; the reader agreement does.);
* ``expected_precision`` / ``expected_recall`` of the flags as the model sees them: the mean of 1 − p_clean over
  the flagged rows, and their share of the summed 1 − p_clean. Model-based: the scores vouch for themselves (1.0
  on a clean validation set whose 4 % flags were all wrong), so trust them only as far as the verdict says;
* ``confirmed_precision`` / ``confirmed_recall`` — the share of the flagged rows that both readings (probe and
  zero-shot) read as a class other than the given label, and the flags' share of all rows read so: an
  independent check of the flags (:func:`_confirmed`). The check sample measures the truth.

The ``verdict`` is ``weak`` when the two readings agree on fewer than :data:`WEAK_READER_AGREEMENT` of the rows, or
the mixture's separation is below :data:`WEAK_SEPARATION`, or (image-only models) the probe agrees with fewer than
:data:`WEAK_PROBE_AGREEMENT` of the labels; otherwise ``good``. Apart from the verdict (a model may read the data well
and still flag right labels), ``flags_caution`` says so when the pictures confirm fewer than :data:`WEAK_CONFIRMED`
of at least :data:`MIN_FLAGS_CONFIRMED` flags. The thresholds were chosen on the benchmark sets,
where they separate the data sets on which the default's flags are good from those on which they are not
(docs/benchmarks.md, "How right the audit is"). ``reasons`` says which measure fell short.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from labelsieve.detectors.common.base import DetectionContext, DetectionResult
from labelsieve.detectors.common.linear_probe import fit_linear_probe, out_of_fold_probs
from labelsieve.detectors.common.text_side import SINGLE_TEMPLATE

__all__ = ["MAX_ROWS", "MIN_FLAGS_CONFIRMED", "WEAK_CONFIRMED", "WEAK_PROBE_AGREEMENT", "WEAK_READER_AGREEMENT",
           "WEAK_SEPARATION", "measure_competence"]

#: The probe and the zero-shot reading are measured on a seeded random subset of at most this many rows.
MAX_ROWS = 20_000
#: Below this agreement of the two independent readings the model is weak for the data.
WEAK_READER_AGREEMENT = 0.8
#: Below this separation of the calibration mixture's components the scores barely tell right from wrong labels.
WEAK_SEPARATION = 2.0
#: For a model without a text side: below this probe agreement with the given labels the data are either very
#: noisy or poorly read; either way the flags need checking.
WEAK_PROBE_AGREEMENT = 0.6
#: Below this share of flags that the pictures confirm (:func:`_confirmed`) the flags need checking ...
WEAK_CONFIRMED = 0.5
#: ... when at least this many rows are flagged (a handful of flags says little either way).
MIN_FLAGS_CONFIRMED = 10
_FOLDS = 3
_EPOCHS = 20


def _separation(info: dict[str, Any]) -> float | None:
    cal = (info or {}).get("calibration") or {}
    means, sd = cal.get("means"), cal.get("sd")
    if cal.get("status") != "fitted" or not means or not sd:
        return None
    return float((means[1] - means[0]) / sd)


def _kept_probe(ctx: DetectionContext, rows: np.ndarray, labels: np.ndarray, flags: np.ndarray) -> np.ndarray | None:
    """The image side's reading of ``rows``: a linear probe trained on the rows the detector keeps (so wrong labels,
    which a probe on every row learns when they are systematic, barely teach it), out of fold for the kept rows
    and by one probe on all kept rows for the flagged ones. None when the kept rows hold fewer than two classes
    with two rows each."""
    kept = rows[~flags[rows]]
    counts = np.bincount(labels[kept], minlength=ctx.n_classes)
    if (counts >= 2).sum() < 2 or counts[counts > 0].min() < 2:
        return None
    x = ctx.feature_rows(rows)
    pos = {int(r): k for k, r in enumerate(rows)}
    kept_at = np.array([pos[int(r)] for r in kept], dtype=np.int64)
    pred = np.empty(len(rows), dtype=np.int64)
    oof = out_of_fold_probs(x[kept_at], labels[kept], ctx.n_classes, folds=_FOLDS, seed=ctx.seed, epochs=_EPOCHS,
                            device=ctx.device)
    pred[kept_at] = oof.argmax(axis=1)
    rest = np.setdiff1d(np.arange(len(rows)), kept_at)
    if len(rest):
        probe = fit_linear_probe(x[kept_at], labels[kept], ctx.n_classes, seed=ctx.seed, epochs=_EPOCHS,
                                 device=ctx.device)
        pred[rest] = probe.probs(x[rest]).argmax(axis=1)
    return pred


def _confirmed(labels: np.ndarray, flags: np.ndarray, probe_pred: np.ndarray,
               zs: np.ndarray | None) -> dict[str, Any]:
    """The flags the pictures confirm: a row is *read as another class* when the probe (and, with a text side, the
    zero-shot classifier too) reads it as a class other than its given label. ``confirmed_precision`` is that share
    among the flagged rows, ``confirmed_recall`` the flagged rows' share of all rows read so. Label-free like the
    rest, but not the detector's own view: the flags' scores cannot vouch for themselves, two readings of the
    pictures can contradict them (a clean set whose flags no reading confirms)."""
    other = probe_pred != labels
    if zs is not None:
        other &= zs != labels
    return {"confirmed_precision": float(other[flags].mean()) if flags.any() else None,
            "confirmed_recall": float(other[flags].sum() / other.sum()) if other.any() else None}


def measure_competence(ctx: DetectionContext, result: DetectionResult, *,
                       oof_probs: np.ndarray | None = None) -> dict[str, Any]:
    """The competence record of an audit (audit.json's ``competence``; see the module docstring).

    Parameters
    ----------
    ctx : DetectionContext
        The rows the detector saw (features, given labels, encoder, seed).
    result : DetectionResult
        The calibrated result (``p_clean``, the flags, ``info["calibration"]``).
    oof_probs : ndarray of shape (n, C), optional
        Out-of-sample class probabilities the user brought (``--pred-probs``): used instead of the probe.
    """
    labels = np.asarray(ctx.labels, dtype=np.int64)
    n = len(labels)
    out: dict[str, Any] = {"rows_measured": 0, "basis": "model (no ground truth; the check sample measures it)"}
    p = np.asarray(result.p_clean, dtype=np.float64)
    flags = np.asarray(result.is_noisy, dtype=bool)
    q = 1.0 - p
    out["expected_precision"] = float(q[flags].mean()) if flags.any() else None
    out["expected_recall"] = float(q[flags].sum() / q.sum()) if q.sum() > 0 else None
    out["separation"] = _separation(result.info)
    rng = np.random.default_rng(np.random.SeedSequence([int(ctx.seed), 0x636F6D70]))  # "comp"
    rows = np.sort(rng.choice(n, MAX_ROWS, replace=False)) if n > MAX_ROWS else np.arange(n)
    probe_pred = None
    if oof_probs is not None:
        probe_pred = np.asarray(oof_probs)[rows].argmax(axis=1)
        out["probe"] = "the out-of-sample probabilities given"
    elif ctx.raw_features() is not None and n >= 2 * _FOLDS:
        probe_pred = _kept_probe(ctx, rows, labels, flags)
        if probe_pred is not None:
            out["probe"] = (f"linear probe on the image features of the rows the detector keeps ({_FOLDS}-fold "
                            f"cross-validated there, {_EPOCHS} epochs), predicting every measured row")
    if probe_pred is not None:
        out["rows_measured"] = int(len(rows))
        out["probe_agreement"] = float((probe_pred == labels[rows]).mean())
    text = ctx.encoder is not None and ctx.encoder.has_text and ctx.raw_features() is not None
    zs = None
    if text:
        emb = ctx.encoder.class_text_embeddings(ctx.classnames, SINGLE_TEMPLATE)
        zs = (ctx.feature_rows(rows) @ emb.T).argmax(axis=1)
        out["zero_shot_agreement"] = float((zs == labels[rows]).mean())
        if probe_pred is not None:
            out["reader_agreement"] = float((zs == probe_pred).mean())
    if probe_pred is not None and oof_probs is None:  # the given probabilities made the flags: no independent check
        out.update(_confirmed(labels[rows], flags[rows], probe_pred, zs))
    reasons = []
    if out.get("reader_agreement") is not None and out["reader_agreement"] < WEAK_READER_AGREEMENT:
        reasons.append(f"the image features and the class names agree on only {out['reader_agreement']:.0%} of the "
                       f"images (< {WEAK_READER_AGREEMENT:.0%})")
    if out["separation"] is not None and out["separation"] < WEAK_SEPARATION:
        reasons.append(f"the scores of right and wrong labels overlap (separation {out['separation']:.1f} < "
                       f"{WEAK_SEPARATION:.0f} standard deviations)")
    if out["separation"] is None:
        reasons.append("the scores show no second population (the calibration could not split them)")
    if not text and out.get("probe_agreement") is not None and out["probe_agreement"] < WEAK_PROBE_AGREEMENT:
        reasons.append(f"a linear probe on the features agrees with only {out['probe_agreement']:.0%} of the given "
                       f"labels (< {WEAK_PROBE_AGREEMENT:.0%})")
    out["verdict"] = "weak" if reasons else "good"
    out["reasons"] = reasons
    confirmed = out.get("confirmed_precision")
    out["flags_caution"] = (f"the pictures confirm only {confirmed:.0%} of the flags (< {WEAK_CONFIRMED:.0%}): many "
                            "flagged labels may be right" if confirmed is not None and confirmed < WEAK_CONFIRMED
                            and flags[rows].sum() >= MIN_FLAGS_CONFIRMED else None)
    return out
