"""``small_loss``: the small-loss criterion (Co-teaching, Han et al. 2018) on linear-probe losses.

Per-sample cross-entropy of the given label under an **out-of-fold** linear probe on the cached
features (stratified K-fold, each sample scored by a probe that never saw it, ``epochs`` short).
Within each given class the ``keep_rate`` fraction with the smallest loss is kept as clean and the
rest is flagged. ``keep_rate`` is ``1 - noise_rate``; the noise rate is given, or estimated as the
mean noisy-component posterior of a 2-component GMM on the losses
(:func:`~labelsieve.detectors.common.selection.fit_gmm_split`).

Why out-of-fold and short: a linear probe on unit-norm CLIP features has enough capacity to fit
the wrong labels of the samples it trains on (C · d weights for n samples), and then their loss
is small for the wrong reason. Scoring each sample with a probe trained on the other folds removes
that, and stopping early (10 epochs) keeps the other folds' wrong labels from being learnt as a
pattern. Measured on mini-CLIP features of 400 Imagenette / 600 CIFAR-10 images with 20 and 40 %
symmetric noise (AUROC of the loss): 5-fold × 10 epochs .93–1.00, 5-fold × 30 epochs .89–.98,
in-sample × 30 epochs .87–.96. In-sample × 10 epochs did as well as 5-fold × 10 here, but how early
is early enough then depends on the number of optimiser steps (the dataset size), which out-of-fold
scoring does not.

``p_clean`` is a **rank score** within the sample's class, not a probability: the kept samples are
spread evenly over (0.5, 1] (the smallest loss highest) and the flagged ones over [0, 0.5), so
``p_clean < 0.5`` is exactly the small-loss decision, and within a class a lower p_clean always
means a larger loss.
"""

from __future__ import annotations

import numpy as np

from labelsieve.core.errors import check_param
from labelsieve.detectors.common.base import DetectionContext, DetectionResult, Detector
from labelsieve.detectors.common.linear_probe import oof_probe_losses
from labelsieve.detectors.common.selection import estimate_noise_rate_from_posterior, fit_gmm_split, small_loss_select
from labelsieve.detectors.registry import register_detector

__all__ = ["SmallLossDetector", "rank_score"]


def rank_score(losses: np.ndarray, keep: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Map per-group loss ranks to [0, 1] with the kept/dropped boundary at 0.5.

    In a group of ``n`` samples of which the ``k`` smallest-loss ones are kept, the sample of rank
    ``r`` (0 = smallest loss; ties by sample order, as :func:`small_loss_select`) gets
    ``1 - 0.5 (r + 0.5) / k`` if kept and ``0.5 - 0.5 (r - k + 0.5) / (n - k)`` if not.

    Parameters
    ----------
    losses : ndarray of shape (n,)
    keep : bool ndarray of shape (n,)
        The small-loss selection (the ``k`` smallest of each group).
    groups : list of int ndarray
        Sample indices of each group (classes, or one group of all samples).

    Returns
    -------
    ndarray of shape (n,), float64 in (0, 1)
    """
    out = np.ones(len(losses), dtype=np.float64)
    for idx in groups:
        if idx.size == 0:
            continue
        order = idx[np.argsort(losses[idx], kind="stable")]
        k = int(keep[idx].sum())
        r = np.arange(idx.size, dtype=np.float64)
        score = np.empty(idx.size, dtype=np.float64)
        score[:k] = 1.0 - 0.5 * (r[:k] + 0.5) / max(k, 1)
        score[k:] = 0.5 - 0.5 * (r[k:] - k + 0.5) / max(idx.size - k, 1)
        out[order] = score
    return out


@register_detector
class SmallLossDetector(Detector):
    """Small-loss selection per class on out-of-fold linear-probe cross-entropy.

    Parameters
    ----------
    noise_rate : float or None, default=None
        Expected fraction of wrong labels in [0, 1); None: estimated from a 2-component GMM on the
        losses. Give at most one of ``noise_rate`` and ``keep_rate``.
    keep_rate : float or None, default=None
        Fraction kept as clean in (0, 1]; None: ``1 - noise_rate``.
    folds : int, default=5
        Out-of-fold probe folds.
    epochs : int, default=10
        Probe epochs per fold (short on purpose, see the module docstring).
    per_class : bool, default=True
        Keep ``keep_rate`` of every given class (False: of all samples together).
    """

    name = "small_loss"
    summary = ("small-loss criterion: keep the (1 - noise rate) smallest out-of-fold probe losses per class; "
               "p_clean = per-class rank score")
    needs_text = False

    def __init__(self, *, noise_rate: float | None = None, keep_rate: float | None = None, folds: int = 5,
                 epochs: int = 10, per_class: bool = True) -> None:
        own = type(self).__name__
        check_param(own, "noise_rate", noise_rate, noise_rate is None or (
            isinstance(noise_rate, (int, float)) and not isinstance(noise_rate, bool) and 0.0 <= noise_rate < 1.0),
            "None or a float in [0, 1)")
        check_param(own, "keep_rate", keep_rate, keep_rate is None or (
            isinstance(keep_rate, (int, float)) and not isinstance(keep_rate, bool) and 0.0 < keep_rate <= 1.0),
            "None or a float in (0, 1]")
        check_param(own, "keep_rate", keep_rate, keep_rate is None or noise_rate is None,
                    "None when noise_rate is given (keep_rate = 1 - noise_rate; give one of them)")
        check_param(own, "folds", folds, isinstance(folds, int) and not isinstance(folds, bool) and folds >= 2,
                    "an int >= 2")
        check_param(own, "epochs", epochs, isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1,
                    "an int >= 1")
        check_param(own, "per_class", per_class, isinstance(per_class, bool), "True or False")
        self.noise_rate = noise_rate
        self.keep_rate = keep_rate
        self.folds = folds
        self.epochs = epochs
        self.per_class = per_class

    def detect(self, ctx: DetectionContext) -> DetectionResult:
        labels = np.asarray(ctx.labels, dtype=np.int64)
        C = ctx.n_classes
        losses, probs = oof_probe_losses(ctx, folds=self.folds, epochs=self.epochs)
        info: dict = {"folds": self.folds, "epochs": self.epochs, "per_class": self.per_class}
        if self.keep_rate is not None:
            keep_rate, source = float(self.keep_rate), "given keep_rate"
        elif self.noise_rate is not None:
            keep_rate, source = 1.0 - float(self.noise_rate), "given noise_rate"
        else:
            split = fit_gmm_split(losses, seed=ctx.seed)
            noise = estimate_noise_rate_from_posterior(split.posterior)
            keep_rate, source = 1.0 - noise, f"GMM on the losses (rule {split.rule!r})"
            info["gmm_rule"] = split.rule
        # a keep rate of 0 is not a selection; small_loss_select keeps at least one per group anyway
        keep_rate = float(np.clip(keep_rate, 1.0 / max(1, len(labels)), 1.0))
        info.update(keep_rate=keep_rate, noise_rate=1.0 - keep_rate, keep_rate_source=source)
        keep = small_loss_select(losses, labels, C, keep_rate=keep_rate, per_class=self.per_class)
        groups = [np.flatnonzero(labels == c) for c in range(C)] if self.per_class else [np.arange(len(labels))]
        p_clean = rank_score(losses, keep, groups)
        info["n_flagged"] = int((~keep).sum())
        scope = "its given class" if self.per_class else "all samples"
        return DetectionResult(
            p_clean=p_clean, probs=probs, threshold=0.5,
            rule=(f"p_clean = rank of the sample's out-of-fold ({self.folds}-fold linear probe) cross-entropy within "
                  f"{scope}, the {keep_rate:.3f} smallest-loss fraction ({source}) mapped to (0.5, 1] and the rest "
                  "to [0, 0.5); flagged if p_clean < 0.5 (the small-loss decision)."),
            info=info,
        )
