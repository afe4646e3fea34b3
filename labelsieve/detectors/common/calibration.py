"""Calibrated ``p_clean`` for every detector, without ground truth: a two-component mixture on the detector's
own score, and the noise estimate that comes with it.

A detector's raw ``p_clean`` ranks samples well but is rarely a probability: a k-NN vote share, a zero-shot
softmax, a GMM posterior of a loss, a rank or a stacked logistic fit each have their own scale (measured:
expected calibration error up to .35 against the truth, docs/benchmarks.md). :func:`calibrate` turns it into
one, the same way for every detector, and keeps the raw value (column ``p_clean_raw``):

1. the raw score is put on a scale ``u = T(p)``; three are tried (:data:`SCALES`): ``logit`` (probabilities
   and posteriors), ``arcsine`` (``arcsin √p``, the variance-stabilising scale of a vote share or proportion)
   and ``identity`` (ranks and bounded scores);
2. on each scale a two-component Gaussian mixture with **one shared variance** is fitted by EM (started from
   the detector's own decision, and from the lowest 10/30/50 % of the scores; the best likelihood is kept):
   the data say how the scores of clean and of mislabelled samples spread — no labels are needed;
3. calibrated ``p_clean`` is the posterior of the higher component. With a shared variance that posterior is
   ``σ(z)``, ``z = a·T(p) + b`` with ``a > 0``; its log-odds are softly bounded to ``±ln(2n)``
   (:func:`log_odds_bound`: ``z / sqrt(1 + (z/L)²)``), because Gaussian tails would otherwise claim
   certainties like 1 − 1e-16 that no finite sample supports and that float64 rounds to a tie. The bound
   saturates too: most clean-looking rows then sit within 1e-12 of ``1 − 1/(2n)``. So the written value mixes
   in the raw score's rank (:func:`with_raw_order`: a share of at most 1e-6, a gap of at least 1e-13
   between rows the detector ordered), which makes it a strictly increasing map of the raw score *as
   written*: the writers keep every p_clean column at full precision (shortest round-trip text), so
   audit.csv, audit.xlsx, audit.html and the exports rank rows exactly as the raw score, with its ties and no
   others, and AUROC and AUPRC are unchanged (tested on the files read back); and the
   noise estimate is ``mean(1 − p_clean)`` — the probabilities and the estimate are one and the same
   number (without the bound it would equal EM's fitted noisy share exactly; with it, within ~1/n);
4. of the three scales, the one whose calibrated decision (``p_clean < 0.5``) agrees best with the detector's
   own decision is kept. The detector's decision is its best-measured output (its F1 in the benchmark); a
   scale on which the mixture splits the scores elsewhere (a skewed clean population cut in two, an atom of
   saturated scores split off) is a mis-specified fit, and this rule drops it without looking at any truth.

Why a shared variance: with two variances the posterior is not monotone in the score (it turns back up in
the far tail of the wider component), which would reorder samples. Why not a map fitted to the detector's own
flags (Platt on its decision): that only reproduces the flag as a steep step, whatever the true noise is.

When the scores hold no second component on the chosen scale — the two means closer than
:data:`MIN_SEPARATION` shared standard deviations, or a weight below :data:`MIN_WEIGHT` — the data cannot say
which samples are noisy; the raw score is kept and ``info["calibration"]["status"]`` says so.

:func:`noise_estimate` gives the expected share of wrong labels, overall and per class, with a bootstrap
interval that covers both the fit (the mixture refitted on resampled rows) and chance (how many wrong labels
rows with those probabilities hold).

Nothing here is specific to one detector: :func:`calibrate` is applied by :func:`labelsieve.api.run_detector`
after ``detector.detect``, to ``p_clean`` and to every ``p_clean_*`` column a detector adds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.special import expit

from labelsieve.detectors.common.base import DetectionResult

__all__ = ["CLIP", "MAP_CLIP", "MAX_RANK_SHARE", "MIN_SEPARATION", "MIN_WEIGHT", "RANK_GAP", "SCALES", "Calibration",
           "calibrate", "fit_calibration", "log_odds_bound", "noise_estimate", "with_raw_order"]

#: Raw scores are clipped to ``[CLIP, 1 − CLIP]`` before the mixture is fitted (saturated scores of 1.0 or 0.0
#: would otherwise be infinitely far out on the logit scale) ...
CLIP = 1e-4
#: ... but not when the fitted map is applied (only to the open interval of normal float64 numbers), so scores
#: that differ keep their order (the written p_clean's rank term orders any that the clip joins). The smallest
#: *normal* number, not the smallest subnormal: the training engine flushes subnormals to zero on a CPU
#: (``torch.set_flush_denormal``), and log(0) warned "divide by zero".
MAP_CLIP = float(np.finfo(np.float64).tiny)
#: Components closer than this many shared standard deviations are one population (no calibration).
MIN_SEPARATION = 1.0
#: A component weighing less than this is not a population (no calibration).
MIN_WEIGHT = 1e-3
_MAX_ITER = 500
_TOL = 1e-9
_INIT_QUANTILES = (0.1, 0.3, 0.5)


def _clip(p: np.ndarray, eps: float = CLIP) -> np.ndarray:
    return np.clip(np.asarray(p, dtype=np.float64), eps, min(1.0 - eps, float(np.nextafter(1.0, 0.0))))


def _logit(p: np.ndarray, eps: float = CLIP) -> np.ndarray:
    q = _clip(p, eps)
    return np.log(q) - np.log1p(-q)


def _arcsine(p: np.ndarray, eps: float = CLIP) -> np.ndarray:
    return np.arcsin(np.sqrt(_clip(p, eps)))


#: The scales the mixture is fitted on, by name: ``T(p, eps)`` with p clipped to ``[eps, 1 − eps]``.
SCALES: dict[str, Callable[..., np.ndarray]] = {"logit": _logit, "arcsine": _arcsine, "identity": _clip}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return expit(np.asarray(z, dtype=np.float64))  # exact in the tails: tiny, not 0.0


def _bounded(z: np.ndarray, bound: float) -> np.ndarray:
    """Log-odds ``z`` softly bounded to (−bound, bound): ``z / sqrt(1 + (z/bound)²)``, strictly increasing."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = z / np.sqrt(1.0 + (z / bound) ** 2)
    far = np.abs(z) > 1e100 * bound  # (z/bound)² overflows, or z is infinite: the bound itself
    return np.where(far, np.sign(z) * bound, out)


def log_odds_bound(n: int) -> float:
    """How sure calibrated p_clean may get with ``n`` scores: log-odds within ``±ln(2n)`` (p within ~1/(2n) of
    0 or 1). A Gaussian mixture's posterior goes to 0 or 1 exponentially fast in its tails — 1 − 1e-16 for
    half of the rows of a wide set — which no data of ``n`` rows supports, and which float64 would round to
    exactly 1.0, tying rows the detector had ordered."""
    return float(np.log(2.0 * max(n, 2)))


@dataclass
class Calibration:
    """A fitted map from raw ``p_clean`` to calibrated ``p_clean``: ``σ(slope · T(p) + intercept)``.

    Attributes
    ----------
    scale : str
        The scale ``T`` (a key of :data:`SCALES`).
    slope, intercept : float
        The map (unused when ``status != "fitted"``: the raw score is kept).
    status : str
        ``"fitted"``, or why the raw score was kept.
    noisy_weight : float
        The fitted share of the noisy component (= mean of 1 − calibrated p_clean when fitted).
    means, sd : list of float, float
        Component means (noisy, clean) and the shared standard deviation on the scale.
    agreement : float
        Share of rows where ``p_clean < 0.5`` agrees with the detector's own decision.
    """

    scale: str = "logit"
    slope: float = 1.0
    intercept: float = 0.0
    status: str = "identity"
    noisy_weight: float = float("nan")
    means: list[float] = field(default_factory=lambda: [float("nan"), float("nan")])
    sd: float = float("nan")
    iterations: int = 0
    agreement: float = float("nan")
    log_likelihood: float = float("nan")
    bound: float = float("inf")

    @property
    def fitted(self) -> bool:
        return self.status == "fitted"

    def __call__(self, p_raw: np.ndarray) -> np.ndarray:
        """Calibrated p_clean of raw scores ``p_raw`` (the raw scores when not fitted)."""
        if not self.fitted:
            return np.asarray(p_raw, dtype=np.float64)
        return self.posterior(SCALES[self.scale](p_raw, MAP_CLIP))

    def posterior(self, u: np.ndarray) -> np.ndarray:
        """Calibrated p_clean of scale values ``u`` (fitted maps only)."""
        return _sigmoid(_bounded(self.slope * np.asarray(u, dtype=np.float64) + self.intercept, self.bound))

    def to_dict(self) -> dict[str, Any]:
        return {"method": "two-component equal-variance Gaussian mixture on a scale of the raw score, EM, no labels",
                "scale": self.scale, "status": self.status, "slope": self.slope, "intercept": self.intercept,
                "noisy_weight": self.noisy_weight, "means": self.means, "sd": self.sd,
                "agreement_with_detector_decision": self.agreement, "log_odds_bound": self.bound,
                "iterations": self.iterations}


def _em(u: np.ndarray, weight: np.ndarray, r: np.ndarray, var_floor: float,
        max_iter: int = _MAX_ITER) -> dict[str, Any]:
    """EM for two Gaussians with one shared variance on points ``u`` with weights ``weight`` (counts), started
    from responsibilities ``r`` of the noisy component."""
    n = float(weight.sum())
    prev = -np.inf
    it, ll = 0, -np.inf
    w = mu_n = mu_c = var = 0.0
    while it < max_iter:
        it += 1
        rw, cw = r * weight, (1 - r) * weight
        w = float(np.clip(rw.sum() / n, 1e-12, 1 - 1e-12))
        mu_n = float((rw * u).sum() / max(rw.sum(), 1e-300))
        mu_c = float((cw * u).sum() / max(cw.sum(), 1e-300))
        var = max(float((rw * (u - mu_n) ** 2 + cw * (u - mu_c) ** 2).sum() / n), var_floor)
        ln = np.log(w) - 0.5 * (u - mu_n) ** 2 / var
        lc = np.log1p(-w) - 0.5 * (u - mu_c) ** 2 / var
        m = np.maximum(ln, lc)
        ll = float((weight * (m + np.log(np.exp(ln - m) + np.exp(lc - m)))).sum()) / n - 0.5 * np.log(var)
        r = _sigmoid(ln - lc)
        if ll - prev < _TOL:
            break
        prev = ll
    return {"w": w, "mu_n": mu_n, "mu_c": mu_c, "var": var, "iterations": it, "ll": ll}


def _from_params(scale: str, prm: dict[str, Any]) -> Calibration:
    """The calibration of fitted mixture parameters (raw score kept when they describe one population)."""
    w, mu_n, mu_c, var = prm["w"], prm["mu_n"], prm["mu_c"], prm["var"]
    sd = float(np.sqrt(var))
    base = {"scale": scale, "noisy_weight": w, "means": [mu_n, mu_c], "sd": sd, "iterations": prm["iterations"],
            "log_likelihood": prm["ll"]}
    if mu_c <= mu_n or (mu_c - mu_n) / sd < MIN_SEPARATION:
        return Calibration(status=f"one population on the {scale} scale: the components are "
                                  f"{(mu_c - mu_n) / sd:.2f} standard deviations apart (< {MIN_SEPARATION}); raw "
                                  "score kept", **base)
    if min(w, 1 - w) < MIN_WEIGHT:
        return Calibration(status=f"one population on the {scale} scale: the smaller component weighs "
                                  f"{min(w, 1 - w):.2g} (< {MIN_WEIGHT}); raw score kept", **base)
    slope = (mu_c - mu_n) / var
    intercept = (mu_n ** 2 - mu_c ** 2) / (2 * var) + float(np.log((1 - w) / w))
    return Calibration(slope=float(slope), intercept=float(intercept), status="fitted", **base)


#: Above this many rows the mixture is fitted on a histogram of the scale values (:data:`EM_BINS` bins): one pass
#: over the rows, then EM at the same cost for any n (the noise estimate's bootstrap already works so).
EXACT_FIT_ROWS = 200_000
EM_BINS = 16_384


def _binned(u: np.ndarray, inits: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(bin centres, counts, each start's share of its rows per bin) of the non-empty bins of ``u``."""
    edges = np.linspace(float(u.min()), float(u.max()) + 1e-12, EM_BINS + 1)
    b = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, EM_BINS - 1)
    counts = np.bincount(b, minlength=EM_BINS).astype(np.float64)
    used = counts > 0
    centre = 0.5 * (edges[:-1] + edges[1:])
    starts = [np.bincount(b, weights=init.astype(np.float64), minlength=EM_BINS)[used] / counts[used]
              for init in inits]
    return centre[used], counts[used], starts


def _fit_scale(u: np.ndarray, inits: list[np.ndarray], weight: np.ndarray | None = None) -> dict[str, Any]:
    """The best-likelihood EM fit on scale values ``u`` over several starts (on a histogram of ``u`` above
    :data:`EXACT_FIT_ROWS` rows)."""
    floor = max(1e-8, 1e-4 * float(np.var(u)))
    if weight is None and len(u) > EXACT_FIT_ROWS:
        u, weight, inits = _binned(u, inits)
    weight = np.ones(len(u)) if weight is None else weight
    fits = [_em(u, weight, init.astype(np.float64), floor) for init in inits]
    return max(fits, key=lambda f: f["ll"])


def fit_calibration(p_raw: np.ndarray, decision: np.ndarray | None = None, *,
                    scales: tuple[str, ...] | None = None) -> Calibration:
    """Fit the calibration of raw scores ``p_raw`` (see the module docstring).

    Parameters
    ----------
    p_raw : ndarray of shape (n,)
        Raw scores in [0, 1], higher = more likely clean.
    decision : ndarray of shape (n,), bool, optional
        The detector's own decision (True = flagged). It starts EM and chooses the scale; without it the
        lowest quarter of the scores stands in.
    scales : tuple of str, optional
        Scales to try (default: all of :data:`SCALES`).

    Returns
    -------
    Calibration
    """
    p = np.asarray(p_raw, dtype=np.float64)
    n = len(p)
    if n < 4 or np.ptp(_clip(p)) < 1e-12:
        return Calibration(status="too few distinct scores to fit; raw score kept")
    dec = None if decision is None else np.asarray(decision, dtype=bool)
    if dec is None or dec.all() or not dec.any():
        dec = p <= np.quantile(p, 0.25)
        if dec.all() or not dec.any():
            dec = p < p.max()
    inits = [dec] + [m for q in _INIT_QUANTILES if (m := p <= np.quantile(p, q)).any() and not m.all()]
    best: Calibration | None = None
    for name in scales or tuple(SCALES):
        cal = _from_params(name, _fit_scale(SCALES[name](p), inits))
        cal.bound = log_odds_bound(n)
        cal.agreement = float(np.mean((cal(p) < 0.5) == dec)) if cal.fitted else -1.0
        if best is None or (cal.fitted, cal.agreement) > (best.fitted, best.agreement):
            best = cal
    assert best is not None
    return best


def calibrate(result: DetectionResult, labels: np.ndarray | None = None) -> DetectionResult:
    """``result`` with calibrated ``p_clean`` (and ``p_clean_*`` columns), the raw score kept.

    The decision is kept as the detector made it (the same rows), expressed on the calibrated scale: a
    threshold detector's ``p_raw < threshold`` becomes ``flags``, and ``threshold`` becomes the calibrated
    value of the raw threshold. ``info["calibration"]`` records the map; the raw scores go to the column
    ``p_clean_raw``; with ``labels`` (given label of each row) ``info["calibration"]["noise_estimate"]``
    holds :func:`noise_estimate`.
    """
    decision = result.is_noisy
    cal = fit_calibration(result.p_clean, decision)
    p = with_raw_order(cal(result.p_clean), result.p_clean)
    columns = dict(result.columns)
    member_maps = {}
    for name, col in result.columns.items():
        if name.startswith("p_clean_"):
            flag_col = result.columns.get("is_noisy_" + name[len("p_clean_"):])
            member = fit_calibration(np.asarray(col, dtype=np.float64), flag_col)
            columns[name] = with_raw_order(member(col), col)
            member_maps[name] = member.to_dict()
    columns["p_clean_raw"] = result.p_clean
    threshold = float(cal(np.array([result.threshold]))[0]) if result.flags is None else result.threshold
    info = dict(result.info or {})
    info.setdefault("decision", "threshold" if result.flags is None else "flags")  # what made the flags (audit.json)
    info["calibration"] = {**cal.to_dict(), "raw_threshold": result.threshold, "columns": member_maps}
    if labels is not None:
        info["calibration"]["noise_estimate"] = noise_estimate(result.p_clean, cal, labels)
    if cal.fitted:
        rule = (f" p_clean is then calibrated without labels: sigma({cal.slope:.3g}*{cal.scale}(p_raw) + "
                f"{cal.intercept:.3g}), the posterior of a two-component mixture fitted to the raw scores (a monotone "
                "map: same ranking, same flagged rows); the raw score is in p_clean_raw.")
    else:
        rule = f" p_clean is the raw score ({cal.status})."
    rule = result.rule + rule
    return replace(result, p_clean=p, threshold=threshold, flags=np.asarray(decision, dtype=bool), rule=rule,
                   info=info, columns=columns)


#: The smallest gap :func:`with_raw_order` keeps between the calibrated p_clean of two rows whose raw scores differ
#: (up to 10 million distinct raw scores; at most :data:`MAX_RANK_SHARE` in all above). 1e-13 survives float64
#: near 1 (its spacing there is 1.1e-16), the shortest round-trip text the writers use, and the 15 significant
#: digits a spreadsheet keeps of a number (1e-15 near 1), so the written p_clean sorts as the raw score does.
RANK_GAP = 1e-13
#: The largest share of the written p_clean that the rank term takes: it moves a probability by at most this.
MAX_RANK_SHARE = 1e-6


def with_raw_order(p: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """``(1 − ε)·p + ε·r/R``, ``r`` the dense rank of the raw score (0 … R): rows the detector ordered keep that
    order with a gap of at least ``ε/R`` (:data:`RANK_GAP`) even where the map's output saturates (the bounded
    log-odds put most clean-looking rows within 1e-12 of ``1 − 1/(2n)``) or float64 rounds two outputs to one
    value; rows the detector tied stay tied. ``ε = min(RANK_GAP·R, MAX_RANK_SHARE)``, so no probability moves by
    more than 1e-6 (2.5e-10 at 2,500 rows). Non-finite raw scores are left as they are."""
    p = np.asarray(p, dtype=np.float64)
    raw = np.asarray(raw, dtype=np.float64)
    finite = np.isfinite(raw)
    if not finite.any():
        return p
    _, dense = np.unique(raw[finite], return_inverse=True)
    top = int(dense.max())
    if top == 0:
        return p
    eps = min(RANK_GAP * top, MAX_RANK_SHARE)
    out = p.copy()
    out[finite] = (1.0 - eps) * p[finite] + eps * (dense / top)
    return out


def noise_estimate(p_raw: np.ndarray, cal: Calibration, labels: np.ndarray, *, n_classes: int | None = None,
                   n_boot: int = 200, level: float = 0.95, seed: int = 0, bins: int = 2048) -> dict[str, Any]:
    """Expected share of wrong labels, ``mean(1 − p_clean)`` of the calibrated p_clean, overall and per class,
    each with a bootstrap interval.

    Each bootstrap round resamples the rows within each given class, refits the mixture on that sample (on
    the scale ``cal`` chose, started from ``cal``'s fit; scores binned into ``bins`` bins so a round costs the
    same for any number of rows), and then draws how many of the rows are wrong given their calibrated
    probabilities. The interval is the central ``level`` share of the rounds: it covers the fit and chance,
    not a mixture model that does not describe the data (docs/benchmarks.md reports how often it held the
    truth on the benchmark).

    Parameters
    ----------
    p_raw : ndarray of shape (n,)
        Raw scores.
    cal : Calibration
        Their fitted calibration.
    labels : ndarray of shape (n,), int
        Given label of each row (class index).

    Returns
    -------
    dict
        ``rate``, ``interval`` ([low, high]), ``per_class`` ({class index: rate}), ``per_class_interval``
        ({class index: [low, high]}), ``level``, ``n_boot``.
    """
    p_raw = np.asarray(p_raw, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    C = int(n_classes or (labels.max() + 1 if len(labels) else 0))
    q = 1.0 - cal(p_raw)
    sizes = np.bincount(labels, minlength=C)
    per_class = {c: float(q[labels == c].mean()) if sizes[c] else 0.0 for c in range(C)}
    out: dict[str, Any] = {"rate": float(q.mean()) if len(q) else 0.0, "per_class": per_class, "level": level,
                           "n_boot": n_boot}
    if len(p_raw) == 0:
        return {**out, "interval": [0.0, 0.0], "per_class_interval": {c: [0.0, 0.0] for c in range(C)}}
    u = SCALES[cal.scale](p_raw)
    edges = np.linspace(u.min(), u.max() + 1e-12, bins + 1)
    centre = 0.5 * (edges[:-1] + edges[1:])
    b = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, bins - 1)
    counts = np.zeros((C, bins))
    np.add.at(counts, (labels, b), 1.0)
    rng = np.random.default_rng(seed)
    floor = max(1e-8, 1e-4 * float(np.var(u)))
    boot_all = np.empty(n_boot)
    boot_cls = np.empty((n_boot, C))
    for k in range(n_boot):
        sample = np.stack([rng.multinomial(int(sizes[c]), counts[c] / sizes[c]) if sizes[c] else np.zeros(bins)
                           for c in range(C)]).astype(np.float64)
        if cal.fitted:
            total = sample.sum(axis=0)
            used = total > 0
            start = 1.0 - _sigmoid(cal.slope * centre[used] + cal.intercept)
            fit = _from_params(cal.scale, _em(centre[used], total[used], start, floor, max_iter=100))
            fit.bound = cal.bound
            q_bin = 1.0 - (fit.posterior(centre) if fit.fitted else _clip(_inverse(cal.scale, centre)))
        else:
            q_bin = 1.0 - _clip(_inverse(cal.scale, centre))
        wrong = rng.binomial(sample.astype(np.int64), np.clip(q_bin, 0.0, 1.0)[None, :]).sum(axis=1)
        boot_cls[k] = wrong / np.maximum(sizes, 1)
        boot_all[k] = wrong.sum() / len(p_raw)
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    out["interval"] = [float(np.quantile(boot_all, lo)), float(np.quantile(boot_all, hi))]
    out["per_class_interval"] = {c: [float(np.quantile(boot_cls[:, c], lo)), float(np.quantile(boot_cls[:, c], hi))]
                                 for c in range(C)}
    return out


def _inverse(scale: str, u: np.ndarray) -> np.ndarray:
    """Raw score of scale values ``u``."""
    if scale == "logit":
        return _sigmoid(u)
    if scale == "arcsine":
        return np.sin(np.clip(u, 0.0, np.pi / 2)) ** 2
    return u
