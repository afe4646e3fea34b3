"""Sample selection shared by the detectors: GMM clean/noisy split, small-loss, class balancing.

All functions take and return numpy arrays, validate their inputs with
:func:`labelsieve.core.errors.check_param`, never return NaN, and handle the degenerate cases (no
samples, one sample, constant losses, empty classes) with a documented rule instead of failing.

References
----------
- Li, Socher & Hoi, "DivideMix: Learning with Noisy Labels as Semi-supervised Learning", ICLR 2020
  (min-max normalised losses, 2-component GMM, ``max_iter=10, reg_covar=5e-4, tol=1e-2``).
- Ahn et al., "Fine tuning Pre trained Models for Robustness Under Noisy Labels" (TURN), 2023
  (per-class GMM, class-balanced subsample).
- Han et al., "Co-teaching", NeurIPS 2018 (small-loss selection).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.mixture import GaussianMixture

from labelsieve.core.errors import check_param

__all__ = [
    "GMMSplit",
    "class_balanced_subsample",
    "estimate_noise_rate_from_posterior",
    "fit_gmm_split",
    "normalize_losses",
    "per_class_gmm_posterior",
    "small_loss_select",
]

#: Smallest sample count a 2-component GMM is fitted to; below it the min-max rule is used.
MIN_GMM_SAMPLES = 4
_CONSTANT_RTOL = 1e-9


# --------------------------------------------------------------------------- validation helpers


def _float_vector(owner: str, name: str, x: object) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    check_param(owner, name, f"array of shape {arr.shape}", arr.ndim == 1, "a 1-D array of shape (n,)")
    check_param(owner, name, "an array with NaN or infinite values", bool(np.all(np.isfinite(arr))),
                "finite (no NaN or infinite values)")
    return arr


def _labels(owner: str, labels: object, n: int, n_classes: int) -> np.ndarray:
    is_int = isinstance(n_classes, (int, np.integer)) and not isinstance(n_classes, bool)
    check_param(owner, "n_classes", n_classes, is_int and n_classes >= 1, "an int >= 1")
    lab = np.asarray(labels)
    check_param(owner, "labels", f"array of shape {lab.shape} and dtype {lab.dtype}",
                lab.shape == (n,) and (lab.size == 0 or np.issubdtype(lab.dtype, np.integer)),
                f"an int array of shape ({n},)")
    lab = lab.astype(np.int64, copy=False)
    if lab.size:
        check_param(owner, "labels", f"values in [{lab.min()}, {lab.max()}]",
                    lab.min() >= 0 and lab.max() < n_classes, f"class indices in [0, {n_classes - 1}]")
    return lab


def _check_gmm_kw(owner: str, max_iter: int, reg_covar: float, tol: float, seed: int) -> None:
    check_param(owner, "max_iter", max_iter, isinstance(max_iter, (int, np.integer)) and max_iter >= 1,
                "an int >= 1")
    check_param(owner, "reg_covar", reg_covar, isinstance(reg_covar, (int, float)) and reg_covar > 0,
                "a float > 0")
    check_param(owner, "tol", tol, isinstance(tol, (int, float)) and tol > 0, "a float > 0")
    check_param(owner, "seed", seed, isinstance(seed, (int, np.integer)) and seed >= 0, "an int >= 0")


# --------------------------------------------------------------------------- normalisation and GMM


def normalize_losses(losses: np.ndarray) -> np.ndarray:
    """Min-max normalise losses to [0, 1], as DivideMix does before its GMM.

    Parameters
    ----------
    losses : array-like of shape (n,)
        Finite per-sample losses.

    Returns
    -------
    ndarray of shape (n,), float64
        ``(l - min) / (max - min)``; all zeros when the losses are (nearly) constant, so never NaN.
    """
    arr = _float_vector("normalize_losses", "losses", losses)
    if arr.size == 0:
        return arr.copy()
    lo, span = float(arr.min()), float(np.ptp(arr))
    if span <= _CONSTANT_RTOL * max(1.0, float(np.abs(arr).max())):
        return np.zeros_like(arr)
    return np.clip((arr - lo) / span, 0.0, 1.0)


@dataclass(frozen=True)
class GMMSplit:
    """The result of :func:`fit_gmm_split`.

    Attributes
    ----------
    posterior : ndarray of shape (n,), float64 in [0, 1]
        Probability that each sample belongs to the low-loss (clean) population.
    rule : str
        How ``posterior`` was obtained: ``"gmm"`` (the mixture), ``"empty"`` (no samples),
        ``"constant"`` (all losses equal: every posterior is 1.0), ``"too_few"`` (fewer than
        ``MIN_GMM_SAMPLES`` samples: min-max rule ``1 - normalised loss``) or ``"collapsed"`` (a
        component holds less than one sample's weight or both means coincide: min-max rule).
    means : tuple of float or None
        (clean, noisy) component means on the normalised [0, 1] loss scale, when a GMM was fitted.
    weights : tuple of float or None
        (clean, noisy) mixture weights, when a GMM was fitted.
    """

    posterior: np.ndarray
    rule: str
    means: tuple[float, float] | None = None
    weights: tuple[float, float] | None = None


def _monotone(norm: np.ndarray, post: np.ndarray, mid: float) -> np.ndarray:
    """Make the posterior non-increasing in the loss in the two tails of a 1-D GMM.

    A 1-D Gaussian mixture gives the *wider* component the far tails on both sides, so a huge loss
    can come out "clean" (or a near-zero loss "noisy"). Below ``mid`` (between the two means) each
    sample gets at least the posterior of any larger loss there; above it, at most the posterior of
    any smaller loss there.
    """
    order = np.argsort(norm, kind="stable")
    p = post[order]
    k = int(np.searchsorted(norm[order], mid, side="right"))
    if k > 0:
        p[:k] = np.maximum.accumulate(p[:k][::-1])[::-1]
    if k < p.size:
        p[k:] = np.minimum.accumulate(p[k:])
    out = np.empty_like(post)
    out[order] = p
    return out


def fit_gmm_split(
    losses: np.ndarray,
    *,
    max_iter: int = 10,
    reg_covar: float = 5e-4,
    tol: float = 1e-2,
    seed: int = 0,
    monotone: bool = False,
) -> GMMSplit:
    """Fit DivideMix's 2-component 1-D GMM to per-sample losses and return the clean posterior.

    The losses are min-max normalised first (:func:`normalize_losses`), so the result does not
    depend on the loss scale and ``reg_covar`` is relative to the loss range. The clean posterior is
    the responsibility of the component with the smaller mean.

    Degenerate inputs follow one rule each (see :attr:`GMMSplit.rule`): no samples -> empty array;
    (nearly) constant losses -> all 1.0 (no evidence of a second population); fewer than
    ``MIN_GMM_SAMPLES`` (4) samples, or a collapsed fit (a component with less than one sample's
    weight, coinciding means, or a non-finite posterior) -> ``1 - normalised loss`` (the
    lowest loss gets 1.0, the highest 0.0).

    Parameters
    ----------
    losses : array-like of shape (n,)
        Finite per-sample losses (lower = more likely clean).
    max_iter : int, default 10
        EM iterations (DivideMix's setting).
    reg_covar : float, default 5e-4
        Variance floor on the normalised scale.
    tol : float, default 1e-2
        EM convergence tolerance.
    seed : int, default 0
        Seed of the k-means initialisation (``random_state``).
    monotone : bool, default False
        False: the raw mixture posterior, ``predict_proba[:, means_.argmin()]``, as DivideMix (and
        the papers built on it) use it. True (labelsieve's option): make the posterior
        non-increasing in the loss in both tails, so that a loss beyond the noisy mean is never more
        "clean" than the noisy mean and a loss below the clean mean never less.

    Returns
    -------
    GMMSplit
    """
    norm = normalize_losses(_float_vector("fit_gmm_split", "losses", losses))
    _check_gmm_kw("fit_gmm_split", max_iter, reg_covar, tol, seed)
    n = norm.size
    if n == 0:
        return GMMSplit(np.zeros(0), "empty")
    if not np.any(norm):
        return GMMSplit(np.ones(n), "constant")
    if n < MIN_GMM_SAMPLES:
        return GMMSplit(1.0 - norm, "too_few")

    gmm = GaussianMixture(n_components=2, max_iter=int(max_iter), tol=float(tol), reg_covar=float(reg_covar),
                          random_state=int(seed))
    x = norm[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter=10 is expected (DivideMix)
        gmm.fit(x)
        resp = gmm.predict_proba(x)
    means = gmm.means_.reshape(-1)
    weights = gmm.weights_.reshape(-1)
    clean = int(means.argmin())
    noisy = 1 - clean
    post = resp[:, clean]
    collapsed = (float(weights.min()) * n < 1.0 or abs(float(means[0] - means[1])) < 1e-6
                 or not np.all(np.isfinite(post)))
    if collapsed:
        return GMMSplit(1.0 - norm, "collapsed", (float(means[clean]), float(means[noisy])),
                        (float(weights[clean]), float(weights[noisy])))
    post = np.clip(post.astype(np.float64), 0.0, 1.0)
    if monotone:
        post = _monotone(norm, post, 0.5 * float(means[clean] + means[noisy]))
    return GMMSplit(post, "gmm", (float(means[clean]), float(means[noisy])),
                    (float(weights[clean]), float(weights[noisy])))


def per_class_gmm_posterior(
    losses: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    min_samples: int = 8,
    max_iter: int = 10,
    reg_covar: float = 5e-4,
    tol: float = 1e-2,
    seed: int = 0,
    monotone: bool = False,
    return_rules: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, list[int]]]:
    """TURN's per-class split: one 2-component GMM on the losses of each given class.

    A class with fewer than ``min_samples`` samples is too small for its own mixture: its samples
    get their posterior from one GMM fitted to the losses of *all* samples (fitted once, only if
    some class needs it). Each fit follows :func:`fit_gmm_split`, including its degenerate-input
    rules (so a class whose losses are all equal gets 1.0).

    Parameters
    ----------
    losses : array-like of shape (n,)
        Finite per-sample losses.
    labels : int array-like of shape (n,)
        Given class of each sample, in ``[0, n_classes)``.
    n_classes : int >= 1
    min_samples : int >= MIN_GMM_SAMPLES (4), default 8
        Smallest class size fitted on its own.
    max_iter, reg_covar, tol, seed, monotone
        Passed to :func:`fit_gmm_split`.
    return_rules : bool, default False
        Also return which rule produced each class's posterior.

    Returns
    -------
    posterior : ndarray of shape (n,), float64 in [0, 1]
    rules : dict of str to list of int
        Only with ``return_rules``: classes per rule of :func:`fit_gmm_split` (``gmm``, ``constant``,
        ``collapsed``, ``too_few``), and ``pooled:<rule>`` for the classes scored by the all-sample fit.
    """
    arr = _float_vector("per_class_gmm_posterior", "losses", losses)
    lab = _labels("per_class_gmm_posterior", labels, arr.size, n_classes)
    check_param("per_class_gmm_posterior", "min_samples", min_samples,
                isinstance(min_samples, (int, np.integer)) and min_samples >= MIN_GMM_SAMPLES,
                f"an int >= {MIN_GMM_SAMPLES}")
    _check_gmm_kw("per_class_gmm_posterior", max_iter, reg_covar, tol, seed)
    kw = {"max_iter": max_iter, "reg_covar": reg_covar, "tol": tol, "seed": seed, "monotone": monotone}
    out = np.ones(arr.size, dtype=np.float64)
    rules: dict[str, list[int]] = {}
    counts = np.bincount(lab, minlength=n_classes)
    small = (counts > 0) & (counts < min_samples)
    if small.any():
        pooled = fit_gmm_split(arr, **kw)
        m = small[lab]
        out[m] = pooled.posterior[m]
        rules.setdefault(f"pooled:{pooled.rule}", []).extend(int(c) for c in np.flatnonzero(small))
    for c in np.flatnonzero(counts >= min_samples):
        m = lab == c
        split = fit_gmm_split(arr[m], **kw)
        out[m] = split.posterior
        rules.setdefault(split.rule, []).append(int(c))
    return (out, rules) if return_rules else out


# --------------------------------------------------------------------------- small loss, balancing


def small_loss_select(
    losses: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    keep_rate: float,
    per_class: bool = True,
) -> np.ndarray:
    """Keep the ``keep_rate`` fraction of samples with the smallest loss (Co-teaching).

    Per class (default), class ``c`` with ``n_c > 0`` samples keeps ``max(1, round(keep_rate * n_c))``
    of them; otherwise ``max(1, round(keep_rate * n))`` overall. Ties are broken by sample order
    (stable sort), so the result is deterministic.

    Parameters
    ----------
    losses : array-like of shape (n,)
    labels : int array-like of shape (n,)
    n_classes : int >= 1
    keep_rate : float in (0, 1]
    per_class : bool, default True

    Returns
    -------
    ndarray of shape (n,), bool
        True for kept (presumed clean) samples.
    """
    arr = _float_vector("small_loss_select", "losses", losses)
    lab = _labels("small_loss_select", labels, arr.size, n_classes)
    check_param("small_loss_select", "keep_rate", keep_rate,
                isinstance(keep_rate, (int, float)) and 0.0 < keep_rate <= 1.0, "a float in (0, 1]")
    keep = np.zeros(arr.size, dtype=bool)
    groups = [np.flatnonzero(lab == c) for c in range(n_classes)] if per_class else [np.arange(arr.size)]
    for idx in groups:
        if idx.size == 0:
            continue
        k = max(1, int(round(keep_rate * idx.size)))
        keep[idx[np.argsort(arr[idx], kind="stable")[:k]]] = True
    return keep


def class_balanced_subsample(
    clean_mask: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    rng: np.random.Generator | int,
    min_per_class: int = 1,
    scores: np.ndarray | None = None,
) -> np.ndarray:
    """TURN's class-balanced subsample of the clean set.

    Rule: let ``m`` be the smallest clean count over the classes that have samples, raised to
    ``min_per_class``. Every class with ``n_c`` samples contributes ``min(m, n_c)`` samples: drawn
    uniformly without replacement from its clean samples when it has enough; otherwise all its clean
    samples plus the rest *borrowed* from its other samples — those with the lowest ``scores`` when
    given (e.g. losses), else drawn uniformly. So a class with no or few clean samples never
    empties the subsample, and with ``min_per_class=1`` this is TURN's rule whenever every class has
    a clean sample.

    Parameters
    ----------
    clean_mask : bool array-like of shape (n,)
        The samples selected as clean.
    labels : int array-like of shape (n,)
    n_classes : int >= 1
    rng : numpy Generator or int
        Randomness of the uniform draws (an int seeds ``np.random.default_rng``).
    min_per_class : int >= 1, default 1
        Floor on the per-class count.
    scores : array-like of shape (n,), optional
        Lower = more likely clean; chooses which non-clean samples are borrowed.

    Returns
    -------
    ndarray of shape (k,), int64
        Sorted sample indices.
    """
    owner = "class_balanced_subsample"
    mask = np.asarray(clean_mask)
    check_param(owner, "clean_mask", f"array of shape {mask.shape} and dtype {mask.dtype}",
                mask.ndim == 1 and (mask.dtype == bool or mask.size == 0), "a bool array of shape (n,)")
    mask = mask.astype(bool, copy=False)
    lab = _labels(owner, labels, mask.size, n_classes)
    check_param(owner, "min_per_class", min_per_class,
                isinstance(min_per_class, (int, np.integer)) and min_per_class >= 1, "an int >= 1")
    check_param(owner, "rng", type(rng).__name__,
                isinstance(rng, np.random.Generator) or (isinstance(rng, (int, np.integer)) and rng >= 0),
                "a numpy Generator or an int seed >= 0")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(int(rng))
    sc = None
    if scores is not None:
        sc = _float_vector(owner, "scores", scores)
        check_param(owner, "scores", f"array of shape {sc.shape}", sc.size == mask.size,
                    f"an array of shape ({mask.size},)")
    counts = np.bincount(lab, minlength=n_classes)
    clean_counts = np.bincount(lab[mask], minlength=n_classes)
    present = counts > 0
    if not present.any():
        return np.zeros(0, dtype=np.int64)
    m = max(int(min_per_class), int(clean_counts[present].min()))
    chosen: list[np.ndarray] = []
    for c in np.flatnonzero(present):
        members = np.flatnonzero(lab == c)
        k = min(m, members.size)
        clean_idx = members[mask[members]]
        if clean_idx.size >= k:
            chosen.append(gen.choice(clean_idx, size=k, replace=False))
            continue
        rest = members[~mask[members]]
        need = k - clean_idx.size
        if sc is not None:
            borrowed = rest[np.argsort(sc[rest], kind="stable")[:need]]
        else:
            borrowed = gen.choice(rest, size=need, replace=False)
        chosen.extend([clean_idx, borrowed])
    return np.sort(np.concatenate(chosen).astype(np.int64))


def estimate_noise_rate_from_posterior(p_clean: np.ndarray) -> float:
    """Expected fraction of wrong labels, ``mean(1 - p_clean)``; 0.0 for no samples.

    Parameters
    ----------
    p_clean : array-like of shape (n,), values in [0, 1]

    Returns
    -------
    float
    """
    p = _float_vector("estimate_noise_rate_from_posterior", "p_clean", p_clean)
    check_param("estimate_noise_rate_from_posterior", "p_clean", "values outside [0, 1]",
                bool(np.all((p >= 0) & (p <= 1))), "probabilities in [0, 1]")
    return float(np.mean(1.0 - p)) if p.size else 0.0
