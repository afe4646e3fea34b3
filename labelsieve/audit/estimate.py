"""What the reviewed rows say about the whole audit, without trusting the model.

A reviewer decides the rows of the check sample (:mod:`labelsieve.audit.checksample`), and maybe others by
choice (usually the top of the list). :func:`estimate_from_reviews` turns those decisions into

* the number and share of wrong labels in the whole dataset, with a 95 % interval;
* the precision and recall of the audit's flags, with intervals;

and :func:`fit_recalibration` into a map that makes ``p_clean`` agree with what the reviewer found.

What counts as wrong: ``relabel`` (the label is wrong) and ``drop`` (the label is wrong or the image is unusable:
either way it should not train a model as labelled); ``keep`` is right.

The estimate is *design-based*: its validity comes from the random draw, not from the model. Within each band of
the design (stratum ``h``, ``N_h`` rows):

1. rows decided *by choice* count exactly when they form the band's top: ``P_h``, the longest run of decided rows
   from the band's first rank on, cut back to end at a row outside the check sample (so that check rows the
   reviewer met at the top by chance do not stretch it). The reviewer's choice of where to stop does not depend
   on which rows the draw picked, so ``P_h`` is fixed with respect to the draw;
2. the other ``M_h = N_h − |P_h|`` rows are estimated from the decided check rows among them: conditional on
   their number ``m_h``, they are a simple random sample of those ``M_h`` rows (the draw was random within the
   band, the review order a random permutation), so ``M_h·x_h/m_h`` is unbiased (``x_h`` of them wrong);
3. decisions elsewhere (not in a band's top run, not in the sample) are not used for the count: using them would
   need to know how they were chosen. They are still applied to the labels, as every decision is.

A band with rows left but no decided check row among them borrows the sample of its neighbour in the same flag
group (collapsed strata); with no decided check row at all there is no estimate (the basis stays the model's).

The 95 % interval is the normal one of this stratified estimator, ``± 1.96·sd`` with
``sd² = Σ_h M_h²·(1 − m_h/M_h)·p_h(1 − p_h)/m_h``, where ``p_h = x_h/m_h``, except in a band whose sample is pure
(every row right, or every row wrong): there ``x_h/m_h`` would claim no uncertainty, and the Jeffreys mean
``(x_h + ½)/(m_h + 1)`` stands in. The interval is clipped to what the reviewer saw (at least the wrong labels
found, at most all rows but the right ones found), so a sample that finds nothing wrong has a lower end of exactly
its known count. Precision and recall of the flags come from the same band estimates (bands never mix flagged and
unflagged rows; recall by the delta method). It is closed-form, so audit.html computes the very same numbers as
labelsieve (review.js ports it). Chosen by measurement against a Monte Carlo interval from the bands' Jeffreys
posteriors with modified ends (Brown, Cai & DasGupta 2001), which held the truth about as often and was wider on
every set tried; coverage and widths on eight data sets: docs/benchmarks.md §14.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit
from scipy.stats import norm

from labelsieve.audit.checksample import REVIEWED_ISSUE, CheckDesign, design_columns

__all__ = ["LEVEL", "Recalibration", "ReviewedSample", "estimate_audit", "estimate_from_reviews",
           "exact_rows", "fit_recalibration", "is_wrong", "sample_from_frame"]

#: The intervals' level.
LEVEL = 0.95


def is_wrong(review: Any, given: Any = None) -> float:
    """1.0 when a decision says the given label is wrong (``relabel``, ``relabel:<another class>``, ``drop``),
    0.0 when it is right (``keep``, or ``relabel:<the given class>``), NaN when there is no decision."""
    r = str(review or "").strip()
    low = r.lower()
    if not low:
        return float("nan")
    if low == "keep":
        return 0.0
    if low.startswith("relabel:") and given is not None and r.split(":", 1)[1].strip() == str(given).strip():
        return 0.0
    if low == "drop" or low.startswith("relabel"):
        return 1.0
    return float("nan")


@dataclass
class ReviewedSample:
    """Decisions on the rows of an audit, aligned with its table (one entry per row).

    Attributes
    ----------
    stratum : ndarray of int
        The row's band in the design (-1: not in the population).
    position : ndarray
        Its 1-based position within its band, in rank order (``stratum_pos``).
    check : ndarray of int
        Its review order in the check sample, 0 when it is not a check row.
    wrong : ndarray of float
        1 wrong, 0 right, NaN undecided (:func:`is_wrong`).
    """

    stratum: np.ndarray
    position: np.ndarray
    check: np.ndarray
    wrong: np.ndarray


@dataclass
class _Cell:
    flagged: bool
    rows: int      # N_h
    exact: int     # |P_h|
    exact_wrong: int
    m: int         # decided check rows outside P_h
    x: int         # of which wrong

    @property
    def left(self) -> int:  # M_h
        return self.rows - self.exact


def _bands(design: CheckDesign, s: ReviewedSample) -> tuple[list[_Cell], np.ndarray]:
    """Each band's exact top run and its sample (steps 1-2 of the module docstring), and which rows are in a top
    run. A top run is the band's positions 1, 2, … as long as each is present and decided (a reviews CSV lists
    decided and check rows only: a gap in the positions ends the run)."""
    out = []
    decided = np.isfinite(s.wrong)
    in_top = np.zeros(len(s.wrong), dtype=bool)
    for h, st in enumerate(design.strata):
        at = np.nonzero(s.stratum == h)[0]
        at = at[np.argsort(s.position[at], kind="stable")]
        dec, chk, y = decided[at], s.check[at] > 0, s.wrong[at]
        run = dec & (s.position[at] == np.arange(1, len(at) + 1))
        k = int(np.argmin(run)) if not run.all() else len(run)
        while k > 0 and chk[k - 1]:
            k -= 1
        in_top[at[:k]] = True
        rest = slice(k, None)
        sampled = dec[rest] & chk[rest]
        out.append(_Cell(flagged=st.flagged, rows=st.rows, exact=k, exact_wrong=int(np.nansum(y[:k])),
                         m=int(sampled.sum()), x=int(y[rest][sampled].sum())))
    return out, in_top


def exact_rows(design: CheckDesign, sample: ReviewedSample) -> np.ndarray:
    """Rows counted exactly: the bands' top runs of decided rows (a re-audit may trust them, check rows included;
    the other decided check rows are the random sample)."""
    return _bands(design, sample)[1]


def _collapse(cells: list[_Cell]) -> list[list[_Cell]]:
    """Groups of bands estimated together: a band with rows left and no sample joins its nearest neighbour in the
    same flag group that has one (then any band that has one)."""
    groups: list[list[_Cell]] = [[c] for c in cells]

    def needy(g: list[_Cell]) -> bool:
        return sum(c.left for c in g) > 0 and sum(c.m for c in g) == 0

    changed = True
    while changed and any(needy(g) for g in groups):
        changed = False
        for i, g in enumerate(groups):
            if not needy(g):
                continue
            flag = g[0].flagged
            near = [j for j in sorted(range(len(groups)), key=lambda j: abs(j - i))
                    if j != i and groups[j][0].flagged == flag and sum(c.m for c in groups[j])]
            near = near or [j for j in sorted(range(len(groups)), key=lambda j: abs(j - i))
                            if j != i and sum(c.m for c in groups[j])]
            if not near:
                return groups
            j = near[0]
            groups[j] = groups[j] + g if j < i else g + groups[j]
            del groups[i]
            changed = True
            break
    return groups


def _band_variance(left: int, m: int, x: int) -> float:
    """Variance of ``left·x/m``, the estimated wrong labels among ``left`` rows from ``m`` of them sampled at random
    (``x`` wrong): ``left²·(1 − m/left)·p(1 − p)/m``, with ``p = x/m``, or the Jeffreys mean ``(x + ½)/(m + 1)``
    when the sample is pure (all right or all wrong), where ``x/m`` would claim no uncertainty at all."""
    if m == 0 or left <= m:
        return 0.0
    p = x / m if 0 < x < m else (x + 0.5) / (m + 1.0)
    return left * left * (1.0 - m / left) * p * (1.0 - p) / m


def _z(level: float) -> float:
    return float(norm.ppf(1.0 - (1.0 - level) / 2.0))


def estimate_from_reviews(design: CheckDesign, sample: ReviewedSample, *, known_rows: int = 0, known_wrong: int = 0,
                          level: float = LEVEL) -> dict[str, Any] | None:
    """The design-based estimate of wrong labels, and of the flags' precision and recall.

    Parameters
    ----------
    design : CheckDesign
        The check sample's design (audit.json's ``check_sample``).
    sample : ReviewedSample
        The decisions, aligned with the audit's rows.
    known_rows, known_wrong : int
        Readable rows outside the design's population whose labels a reviewer already decided (a re-audit's
        ``reviewed`` rows), and how many of them were wrong: counted exactly.
    level : float
        Interval level (0.95).

    Returns
    -------
    dict or None
        ``basis`` ("reviewed sample"), ``rows`` (readable rows covered), ``wrong`` and ``rate`` (point
        estimates), ``wrong_interval`` and ``interval``, ``level``, ``check_reviewed`` (decided check rows),
        ``check_size``, ``exact_rows`` and ``exact_wrong`` (rows counted exactly: the bands' top runs and
        ``known_rows``), ``flagged`` (rows flagged in the population), ``precision``, ``precision_interval``,
        ``recall``, ``recall_interval`` (of the flags; None when undefined), ``collapsed`` (bands that borrowed a
        neighbour's sample) and ``strata`` (per band: rows, exact, sampled, wrong). None when no check row is
        decided.
    """
    cells, _ = _bands(design, sample)
    if not design.strata or (sum(c.m for c in cells) == 0 and sum(c.left for c in cells) > 0):
        return None  # nothing of the sample decided, and rows left that only the sample could speak for
    groups = _collapse(cells)
    point = {True: 0.0, False: 0.0}
    var = {True: 0.0, False: 0.0}
    for g in groups:
        left, m, x = sum(c.left for c in g), sum(c.m for c in g), sum(c.x for c in g)
        if left and not m:
            return None
        v = _band_variance(left, m, x)
        for f in {c.flagged for c in g}:  # a group pooled across the flag splits its estimate by rows
            share = sum(c.left for c in g if c.flagged == f) / left if left else 0.0
            point[f] += sum(c.exact_wrong for c in g if c.flagged == f) + (left * x / m * share if m else 0.0)
            var[f] += v * share * share
    rows = sum(c.rows for c in cells) + int(known_rows)
    # what the reviewer saw bounds the interval: at least the wrong labels found, at most all but the right ones
    seen_wrong = {f: sum(c.exact_wrong + c.x for c in cells if c.flagged == f) for f in (True, False)}
    seen_right = {f: sum(c.exact - c.exact_wrong + c.m - c.x for c in cells if c.flagged == f) for f in (True, False)}
    z = _z(level)
    wrong = point[True] + point[False] + known_wrong
    sd = float(np.sqrt(var[True] + var[False]))
    lo = max(wrong - z * sd, seen_wrong[True] + seen_wrong[False] + known_wrong)
    hi = min(wrong + z * sd, rows - seen_right[True] - seen_right[False] - (known_rows - known_wrong))
    n_flagged = sum(c.rows for c in cells if c.flagged)
    out: dict[str, Any] = {
        "basis": "reviewed sample", "rows": rows, "wrong": float(wrong), "rate": float(wrong / rows) if rows else 0.0,
        "wrong_interval": [float(lo), float(hi)], "interval": [lo / rows, hi / rows] if rows else [0.0, 0.0],
        "level": level, "method": "stratified estimator (post-stratified within bands, top runs exact), normal "
                                  "interval with the Jeffreys mean for bands whose sample is pure",
        "check_reviewed": int(((sample.check > 0) & np.isfinite(sample.wrong) & (sample.stratum >= 0)).sum()),
        "check_size": design.size, "exact_rows": int(sum(c.exact for c in cells) + known_rows),
        "exact_wrong": int(sum(c.exact_wrong for c in cells) + known_wrong), "flagged": int(n_flagged),
        "collapsed": sum(len(g) - 1 for g in groups),
        "strata": [{"flagged": c.flagged, "rows": c.rows, "exact": c.exact, "exact_wrong": c.exact_wrong,
                    "sampled": c.m, "sampled_wrong": c.x} for c in cells],
    }
    found, missed = point[True], point[False]
    out["precision"], out["precision_interval"] = None, None
    if n_flagged:
        prec = found / n_flagged
        plo, phi = _agresti_coull(prec, var[True] / n_flagged ** 2, sum(c.m for c in cells if c.flagged), z)
        out["precision"] = float(prec)
        out["precision_interval"] = [max(plo, seen_wrong[True] / n_flagged),
                                     min(phi, (n_flagged - seen_right[True]) / n_flagged)]
    out["recall"], out["recall_interval"] = None, None
    if found + missed > 0:
        rec = found / (found + missed)
        sd_r = np.sqrt(missed ** 2 * var[True] + found ** 2 * var[False]) / (found + missed) ** 2
        out["recall"] = float(rec)
        out["recall_interval"] = [float(max(rec - z * sd_r, 0.0)), float(min(rec + z * sd_r, 1.0))]
    return out


def _agresti_coull(p: float, var: float, m: int, z: float) -> tuple[float, float]:
    """Agresti and Coull's interval for a proportion ``p`` estimated with variance ``var`` from a stratified sample
    of ``m`` rows, on the design's effective sample size ``n = p(1 − p)/var`` (Kish): ``z²/2`` successes and failures
    added, ``p̃ ± z·√(p̃(1 − p̃)/(n + z²))``. The flags' precision is often one band's share from a dozen or two sampled
    rows, where ``p ± z·sd`` held it in 87 % of draws (a 600-row CIFAR-10 audit, 12 flagged rows sampled) and
    Wilson's interval in 92 % near 1 (Imagenette, 20 rows, precision .97). A pure sample takes the Jeffreys share
    ``½/(m + 1)`` for ``p(1 − p)``'s ``p``; no variance (every row counted exactly): ``[p, p]``."""
    if var <= 0.0:
        return float(p), float(p)
    q = min(max(p, 0.5 / (m + 1.0)), 1.0 - 0.5 / (m + 1.0))
    n = q * (1.0 - q) / var
    nt = n + z * z
    pt = (p * n + z * z / 2.0) / nt
    half = z * np.sqrt(pt * (1.0 - pt) / nt)
    return float(max(pt - half, 0.0)), float(min(pt + half, 1.0))


#: An interval wider than this (±6 points) makes :func:`suggested_check_size` name a larger check sample.
TARGET_WIDTH = 0.12


def suggested_check_size(est: dict[str, Any], check_size: int) -> int | None:
    """The check size that would bring a fully reviewed sample's interval to about :data:`TARGET_WIDTH`
    (``K·(width/TARGET_WIDTH)²``, the width shrinking as 1/√rows, rounded up to 25), or None when the interval is
    narrower already or the sample is not fully reviewed. review.js's ``widerHint`` computes the same."""
    width = est["interval"][1] - est["interval"][0]
    if est["check_reviewed"] < check_size or check_size <= 0 or width <= TARGET_WIDTH:
        return None
    return int(math.ceil(check_size * (width / TARGET_WIDTH) ** 2 / 25.0) * 25)


@dataclass
class Recalibration:
    """``p_clean ↦ σ(a·ln p_clean − b·ln(1 − p_clean) + c)``, fitted on reviewed rows: beta calibration (Kull, Silva
    Filho and Flach 2017), which takes Platt's map on logit(p) (``a = b``) as a special case and also fits scores
    that saturate on one side only; ``a, b ≥ 0`` keep it non-decreasing, so the ranking stays."""

    a: float
    b: float
    c: float
    rows: int

    def __call__(self, p_clean: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(p_clean, dtype=np.float64), 1e-12, 1 - 1e-12)
        return expit(self.a * np.log(p) - self.b * np.log1p(-p) + self.c)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "beta calibration of p_clean (sigma(a*ln p - b*ln(1-p) + c), a, b >= 0) fitted on the "
                          "reviewed check rows, design-weighted, shrunk towards the identity map; the ranking is "
                          "unchanged", "a": self.a, "b": self.b, "c": self.c, "rows": self.rows}


#: Prior standard deviation of the recalibration's parameters around the identity map (a = b = 1, c = 0): with few
#: reviewed rows the map stays near the label-free calibration.
PRIOR_SD = 2.0


def fit_recalibration(p_clean: np.ndarray, wrong: np.ndarray, weight: np.ndarray | None = None) -> Recalibration | None:
    """Fit :class:`Recalibration` on reviewed rows (``wrong``: 1/0) by weighted maximum likelihood with a Gaussian
    prior (:data:`PRIOR_SD`) around the identity map (L-BFGS-B, ``a, b ≥ 0``); the weights (design weights of
    check rows) are scaled to sum to the number of rows. None with fewer than 2 rows.

    Chosen by measurement against Platt's map, isotonic regression on the rank and the bands' own rates (100
    reviewed rows, 40 draws, ECE on the unreviewed rows of CIFAR-10 with 30 % pair noise, 3,000 images): TURN's
    probe .130 → .039 (Platt .038, isotonic .050, bands .056); kNN .122 → .055 (Platt .073); confident learning
    .330 → .058 (Platt .054)."""
    p = np.clip(np.asarray(p_clean, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = 1.0 - np.asarray(wrong, dtype=np.float64)  # 1 = label right
    ok = np.isfinite(p) & np.isfinite(y)
    p, y = p[ok], y[ok]
    if len(p) < 2:
        return None
    w = np.ones(len(p)) if weight is None else np.asarray(weight, dtype=np.float64)[ok]
    w = w * len(w) / w.sum()
    f1, f2 = np.log(p), -np.log1p(-p)
    prior = np.array([1.0, 1.0, 0.0])

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Penalised weighted negative log-likelihood and its gradient."""
        u = theta[0] * f1 + theta[1] * f2 + theta[2]
        nll = np.sum(w * (np.logaddexp(0.0, u) - y * u))
        g = w * (expit(u) - y)
        grad = np.array([np.sum(g * f1), np.sum(g * f2), np.sum(g)]) + (theta - prior) / PRIOR_SD ** 2
        return float(nll + np.sum((theta - prior) ** 2) / (2 * PRIOR_SD ** 2)), grad

    theta = minimize(loss, prior, jac=True, method="L-BFGS-B", bounds=[(0.0, None), (0.0, None), (None, None)]).x
    return Recalibration(a=float(theta[0]), b=float(theta[1]), c=float(theta[2]), rows=int(len(p)))


def sample_from_frame(frame: pd.DataFrame) -> tuple[ReviewedSample, int, int]:
    """The :class:`ReviewedSample` of a table that carries the design per row (``check``, ``stratum``,
    ``stratum_pos``: :func:`~labelsieve.audit.checksample.design_columns`, or a reviews CSV from audit.html) and
    the decisions (``review``, ``given_label``); with the rows a reviewer decided before this audit (``issue`` =
    ``reviewed``), counted exactly: ``(sample, known_rows, known_wrong)``."""
    def ints(col: str) -> np.ndarray:
        if col not in frame.columns:
            return np.full(len(frame), -1, dtype=np.int64)
        return pd.to_numeric(frame[col], errors="coerce").fillna(-1).to_numpy(dtype=np.int64)

    given = frame["given_label"].astype(str).to_numpy() if "given_label" in frame.columns else [None] * len(frame)
    review = frame["review"].astype(str).to_numpy() if "review" in frame.columns else [""] * len(frame)
    wrong = np.array([is_wrong(r, g) for r, g in zip(review, given, strict=True)], dtype=np.float64)
    check = np.maximum(ints("check"), 0)
    sample = ReviewedSample(stratum=ints("stratum"), position=ints("stratum_pos"), check=check, wrong=wrong)
    issue = frame["issue"].astype(str).to_numpy() if "issue" in frame.columns else np.full(len(frame), "")
    known = (issue == REVIEWED_ISSUE) & np.isfinite(wrong)
    return sample, int(known.sum()), int(np.nansum(wrong[known]))


def estimate_audit(table: pd.DataFrame, design: CheckDesign, **kw: Any) -> dict[str, Any] | None:
    """:func:`estimate_from_reviews` of an audit table whose ``review`` column holds the decisions (audit.csv as a
    spreadsheet saved it, with the reviews of audit.html or a review tool merged in) under its own design."""
    cols = design_columns(table, design)
    frame = pd.concat([table.drop(columns=[c for c in cols.columns if c in table.columns]), cols], axis=1)
    sample, known_rows, known_wrong = sample_from_frame(frame)
    return estimate_from_reviews(design, sample, known_rows=known_rows, known_wrong=known_wrong, **kw)
