"""Sample selection: GMM split quality on bimodal losses, per-class GMM on real CIFAR-10N labels,
small-loss and class-balanced selection, and every degenerate input."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from labelsieve import testing
from labelsieve.core.errors import ParameterError
from labelsieve.detectors.common.selection import (
    class_balanced_subsample,
    estimate_noise_rate_from_posterior,
    fit_gmm_split,
    normalize_losses,
    per_class_gmm_posterior,
    small_loss_select,
)


def _ce_losses(noisy: np.ndarray, rng: np.random.Generator, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """CE-like losses -log p_y: p_y ~ Beta(8, 2) for clean samples, Beta(1, 6) for noisy ones."""
    n = noisy.size
    p = np.where(noisy, rng.beta(1, 6, n), rng.beta(8, 2, n))
    return -np.log(np.clip(p, 1e-12, 1.0)) * scale


def test_normalize_losses():
    np.testing.assert_allclose(normalize_losses([2.0, 4.0, 3.0]), [0.0, 1.0, 0.5])
    assert normalize_losses(np.full(5, 7.3)).tolist() == [0.0] * 5
    assert normalize_losses([]).shape == (0,)
    with pytest.raises(ParameterError, match="finite"):
        normalize_losses([1.0, np.nan])


def test_gmm_separates_bimodal_losses():
    rng = np.random.default_rng(0)
    noisy = rng.random(4000) < 0.3
    losses = _ce_losses(noisy, rng)
    split = fit_gmm_split(losses)
    assert split.rule == "gmm"
    assert split.means[0] < split.means[1]
    assert split.weights[1] == pytest.approx(0.3, abs=0.03)
    p = split.posterior
    assert p.shape == (4000,) and np.all((p >= 0) & (p <= 1))
    assert roc_auc_score(~noisy, p) > 0.99
    assert ((p > 0.5) == ~noisy).mean() > 0.97
    assert estimate_noise_rate_from_posterior(p) == pytest.approx(0.3, abs=0.03)
    # scale-free (losses are normalised first) and deterministic with a seed
    np.testing.assert_allclose(fit_gmm_split(losses * 100 + 5).posterior, p, atol=1e-6)
    np.testing.assert_array_equal(fit_gmm_split(losses, seed=0).posterior, p)


def test_raw_posterior_by_default_and_monotone_option_fixes_the_wide_component_tail():
    """By default the posterior is DivideMix's raw one, ``predict_proba[:, means_.argmin()]`` of a GMM on the
    min-max normalised losses; ``monotone=True`` (labelsieve's option) fixes the far low tail, which a wide
    noisy component otherwise claims: zero-loss samples come out noisy."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    losses = np.r_[rng.normal(0.3, 0.03, 800), rng.normal(0.8, 0.2, 200), np.zeros(5)]
    raw = fit_gmm_split(losses).posterior
    norm = (losses - losses.min()) / (losses.max() - losses.min())
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=0).fit(norm[:, None])
    np.testing.assert_allclose(raw, gmm.predict_proba(norm[:, None])[:, gmm.means_.argmin()], atol=1e-12)
    assert fit_gmm_split(losses, monotone=False).posterior.tolist() == raw.tolist()
    mono = fit_gmm_split(losses, monotone=True).posterior
    assert raw[-5:].max() < 0.01  # raw DivideMix posterior: the lowest losses are "noisy"
    assert mono[-5:].min() > 0.99  # fixed
    order = np.argsort(losses, kind="stable")
    assert np.all(np.diff(mono[order]) <= 1e-12)  # non-increasing in the loss
    # the bulk is untouched: same decisions on the two real populations
    np.testing.assert_array_equal(raw[:1000] > 0.5, mono[:1000] > 0.5)
    assert (mono[:800] > 0.5).mean() > 0.99 and (mono[800:1000] > 0.5).mean() < 0.05


@pytest.mark.parametrize(
    ("losses", "rule", "expected"),
    [
        ([], "empty", []),
        ([3.0], "constant", [1.0]),
        ([2.0, 2.0, 2.0, 2.0, 2.0, 2.0], "constant", [1.0] * 6),
        ([0.0, 1.0, 4.0], "too_few", [1.0, 0.75, 0.0]),
    ],
)
def test_gmm_degenerate_inputs(losses, rule, expected):
    split = fit_gmm_split(np.asarray(losses, dtype=float))
    assert split.rule == rule
    np.testing.assert_allclose(split.posterior, expected)


def test_gmm_single_outlier_and_collapse_stay_finite():
    # 100 identical losses and one outlier: the outlier is the noisy component
    p = fit_gmm_split(np.r_[np.zeros(100), 5.0]).posterior
    assert np.all(np.isfinite(p)) and p[:100].min() > 0.99 and p[100] < 0.01
    # two tight clusters: both components well defined
    p2 = fit_gmm_split(np.r_[np.zeros(50), np.ones(50)]).posterior
    np.testing.assert_allclose(p2, np.r_[np.ones(50), np.zeros(50)], atol=1e-6)


def test_per_class_gmm_on_real_cifar10n_labels(shared):
    """Class-dependent loss scales (some classes are harder): per-class GMM beats one global GMM."""
    rows = testing.read_csv_rows(shared / "data" / "cifar10" / "cifar10n.csv")[:5000]
    classes = sorted({r["clean_label"] for r in rows})
    labels = np.array([classes.index(r["worse_label"]) for r in rows])
    noisy = np.array([r["worse_label"] != r["clean_label"] for r in rows])
    assert 0.38 < noisy.mean() < 0.45
    rng = np.random.default_rng(1)
    scale = 0.3 + 0.4 * labels  # class c's losses are (0.3 + 0.4 c) times larger
    losses = _ce_losses(noisy, rng, scale)
    glob = fit_gmm_split(losses).posterior
    per = per_class_gmm_posterior(losses, labels, 10)
    assert per.shape == (5000,) and np.all((per >= 0) & (per <= 1))
    auc_glob, auc_per = roc_auc_score(~noisy, glob), roc_auc_score(~noisy, per)
    acc_glob, acc_per = ((glob > 0.6) == ~noisy).mean(), ((per > 0.6) == ~noisy).mean()
    assert auc_per > 0.97
    assert acc_per > 0.93 and acc_per > acc_glob + 0.05
    assert auc_per > auc_glob


def test_per_class_gmm_small_and_empty_classes_use_global_fit():
    rng = np.random.default_rng(0)
    noisy = rng.random(200) < 0.3
    losses = _ce_losses(noisy, rng)
    labels = np.r_[np.zeros(195, dtype=int), np.full(5, 1)]  # class 1 has 5 samples, class 2 none
    p = per_class_gmm_posterior(losses, labels, 3, min_samples=8)
    glob = fit_gmm_split(losses).posterior
    np.testing.assert_allclose(p[195:], glob[195:])
    np.testing.assert_allclose(p[:195], fit_gmm_split(losses[:195]).posterior)
    # a class whose losses are all equal is all clean; one sample in a class still gets a number
    labels2 = np.r_[np.zeros(199, dtype=int), 1]
    losses2 = np.r_[np.full(199, 0.5), 9.0]
    p2 = per_class_gmm_posterior(losses2, labels2, 2)
    assert np.all(p2[:199] == 1.0) and np.isfinite(p2[199]) and p2[199] < 0.01
    assert per_class_gmm_posterior(np.zeros(0), np.zeros(0, dtype=int), 3).shape == (0,)
    with pytest.raises(ParameterError, match="min_samples"):
        per_class_gmm_posterior(losses, labels, 3, min_samples=2)
    with pytest.raises(ParameterError, match=r"class indices in \[0, 0\]"):
        per_class_gmm_posterior(losses, labels, 1)


def test_small_loss_select_per_class_and_global():
    losses = np.array([0.1, 0.9, 0.5, 0.3, 2.0, 0.05, 0.7, 0.2])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    keep = small_loss_select(losses, labels, 4, keep_rate=0.5)
    # class 0: 2 of 4 (0.1, 0.3); class 1: round(1.5)=2 of 3 (0.05, 0.7); class 2: at least 1
    np.testing.assert_array_equal(keep, [True, False, False, True, False, True, True, True])
    keep_all = small_loss_select(losses, labels, 4, keep_rate=0.5, per_class=False)
    np.testing.assert_array_equal(np.flatnonzero(keep_all), [0, 3, 5, 7])
    assert small_loss_select(losses, labels, 4, keep_rate=0.01).sum() == 3  # one per non-empty class
    assert small_loss_select(losses, labels, 4, keep_rate=1.0).all()
    with pytest.raises(ParameterError, match="keep_rate"):
        small_loss_select(losses, labels, 4, keep_rate=0.0)


def test_small_loss_select_finds_noisy_samples():
    rng = np.random.default_rng(3)
    noisy = rng.random(3000) < 0.2
    labels = rng.integers(0, 10, 3000)
    keep = small_loss_select(_ce_losses(noisy, rng), labels, 10, keep_rate=0.8)
    assert keep.mean() == pytest.approx(0.8, abs=0.01)
    assert (~noisy[keep]).mean() > 0.97  # the kept set is almost all clean


def test_class_balanced_subsample_turn_rule():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [100, 60, 40])
    clean = np.zeros(200, dtype=bool)
    clean[:80] = True      # class 0: 80 clean
    clean[100:130] = True  # class 1: 30 clean
    clean[160:185] = True  # class 2: 25 clean
    idx = class_balanced_subsample(clean, labels, 3, rng=rng)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx], minlength=3).tolist() == [25, 25, 25]
    assert clean[idx].all()
    # deterministic with the same seed; a different seed draws differently
    np.testing.assert_array_equal(idx, class_balanced_subsample(clean, labels, 3, rng=np.random.default_rng(0)))
    np.testing.assert_array_equal(idx, class_balanced_subsample(clean, labels, 3, rng=0))  # int seed
    assert not np.array_equal(idx, class_balanced_subsample(clean, labels, 3, rng=np.random.default_rng(1)))


def test_class_balanced_subsample_empty_clean_class_borrows():
    labels = np.repeat([0, 1, 2], [50, 50, 10])
    clean = np.r_[np.ones(50, bool), np.ones(50, bool), np.zeros(10, bool)]  # class 2: no clean sample
    scores = np.r_[np.zeros(100), np.arange(10, 0, -1.0)]  # in class 2 the last samples score lowest
    idx = class_balanced_subsample(clean, labels, 4, rng=np.random.default_rng(0), min_per_class=3,
                                   scores=scores)
    counts = np.bincount(labels[idx], minlength=4)
    assert counts.tolist() == [3, 3, 3, 0]  # class 3 has no samples: nothing; nothing collapses to 0
    np.testing.assert_array_equal(idx[labels[idx] == 2], [107, 108, 109])
    # without scores the borrowed samples are drawn at random from the class
    idx2 = class_balanced_subsample(clean, labels, 4, rng=np.random.default_rng(0), min_per_class=3)
    assert np.bincount(labels[idx2], minlength=4).tolist() == [3, 3, 3, 0]
    # a class smaller than the floor contributes all it has
    idx3 = class_balanced_subsample(clean, labels, 3, rng=1, min_per_class=20)
    assert np.bincount(labels[idx3], minlength=3).tolist() == [20, 20, 10]
    # nothing at all
    assert class_balanced_subsample(np.zeros(0, bool), np.zeros(0, int), 3, rng=0).shape == (0,)
    with pytest.raises(ParameterError, match="min_per_class"):
        class_balanced_subsample(clean, labels, 3, rng=0, min_per_class=0)
    with pytest.raises(ParameterError, match="rng"):
        class_balanced_subsample(clean, labels, 3, rng="seed")


def test_estimate_noise_rate_from_posterior():
    assert estimate_noise_rate_from_posterior([1.0, 0.0, 0.5, 0.5]) == pytest.approx(0.5)
    assert estimate_noise_rate_from_posterior([]) == 0.0
    with pytest.raises(ParameterError, match=r"\[0, 1\]"):
        estimate_noise_rate_from_posterior([1.5])
