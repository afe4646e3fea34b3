"""``confident_learning``: Northcutt et al. (2021) on out-of-fold linear-probe probabilities.

Out-of-fold probabilities come from a stratified K-fold linear probe on the cached features. The
decision is confident learning's *prune by noise rate*: per-class thresholds t_j (mean
self-confidence of class j), the confident joint, calibrated to the label counts, then for each
off-diagonal cell (given i, true j) the samples of class i with the largest margin p_j − p_i are
flagged, as many as the cell counts; samples whose given label is (within 1e-6) the argmax are
never flagged. This is a port of cleanlab 2.x's ``find_label_issues(filter_by="prune_by_noise_rate")``
(checked against it in the tests). p_clean is the out-of-fold probability of the given label; the
flag is CL's set decision, recorded as such in audit.json.
"""

from __future__ import annotations

import numpy as np

from labelsieve.core.errors import check_param
from labelsieve.detectors.common.base import DetectionContext, DetectionResult, Detector, given_label_prob
from labelsieve.detectors.common.linear_probe import Rows, out_of_fold_probs
from labelsieve.detectors.registry import register_detector

_EPS = 1e-6


def _round_preserving_sum(row: np.ndarray) -> np.ndarray:
    ints = np.round(row)
    diff = int(round(row.sum() - ints.sum()))
    if diff:
        order = np.argsort(row - ints)[:: -1 if diff > 0 else 1][: abs(diff)]
        ints[order] += np.sign(diff)
    return ints.astype(np.int64)


def confident_joint(labels: np.ndarray, probs: np.ndarray, *, calibrate: bool = True) -> np.ndarray:
    """The (calibrated) confident joint C[given, true], shape (K, K), ints."""
    K = probs.shape[1]
    counts = np.bincount(labels, minlength=K)
    thresholds = np.array([probs[labels == k, k].mean() if counts[k] else 2.0 for k in range(K)])
    thresholds = np.maximum(thresholds, 2 * _EPS)
    above = probs >= thresholds - _EPS
    n_above = above.sum(axis=1)
    guess = np.where(n_above > 1, probs.argmax(axis=1), above.argmax(axis=1))
    conf = n_above > 0
    cj = np.zeros((K, K), dtype=np.float64)
    np.add.at(cj, (labels[conf], guess[conf]), 1)
    np.fill_diagonal(cj, np.maximum(cj.diagonal(), 1))
    if calibrate:
        cj = cj / np.maximum(cj.sum(axis=1, keepdims=True), 1e-100) * counts[:, None]
        cj = cj / max(cj.sum(), 1e-100) * counts.sum()
        cj = np.stack([_round_preserving_sum(r) for r in cj])
    return cj.astype(np.int64)


def prune_by_noise_rate(labels: np.ndarray, probs: np.ndarray, *, min_examples_per_class: int = 1) -> np.ndarray:
    """Confident learning's label-issue mask (prune by noise rate)."""
    K = probs.shape[1]
    prune = confident_joint(labels, probs).T.astype(np.float64)  # [true, given]
    diag = prune.diagonal().copy()
    new_diag = np.maximum(diag, min_examples_per_class)
    per_col = np.maximum(np.count_nonzero(prune, axis=0) - 1.0, 1.0)
    prune = prune - (new_diag - diag) / per_col
    prune[prune < 0] = 0
    np.fill_diagonal(prune, new_diag)
    prune = np.stack([_round_preserving_sum(r) for r in prune])
    mask = np.zeros(len(labels), dtype=bool)
    for k in range(K):
        members = np.nonzero(labels == k)[0]
        if len(members) <= min_examples_per_class:
            continue
        pk = probs[members]
        local = np.zeros(len(members), dtype=bool)
        for j in range(K):
            m = int(prune[j, k])
            if j != k and m > 0:
                order = np.argsort(-(pk[:, j] - pk[:, k]), kind="stable")
                local[order[:m]] = True
        mask[members] = local
    adj = probs.copy()
    adj[np.arange(len(labels)), labels] += _EPS
    mask[adj.argmax(axis=1) == labels] = False
    return mask


@register_detector
class ConfidentLearningDetector(Detector):
    """Confident learning on out-of-fold linear-probe probabilities.

    Parameters
    ----------
    folds : int, default=5
    epochs : int, default=30
        Linear-probe epochs per fold.
    """

    name = "confident_learning"
    summary = "confident learning (prune by noise rate) on out-of-fold linear-probe probabilities"

    def __init__(self, *, folds: int = 5, epochs: int = 30) -> None:
        check_param(type(self).__name__, "folds", folds, isinstance(folds, int) and folds >= 2, "an int >= 2")
        check_param(type(self).__name__, "epochs", epochs, isinstance(epochs, int) and epochs >= 1, "an int >= 1")
        self.folds = folds
        self.epochs = epochs

    def detect(self, ctx: DetectionContext) -> DetectionResult:
        probs = out_of_fold_probs(Rows.of(ctx), ctx.labels, ctx.n_classes, folds=self.folds, seed=ctx.seed,
                                  epochs=self.epochs, device=ctx.device)
        return from_probs(ctx.labels, probs, where=f"out-of-fold ({self.folds}-fold linear probe)")


def from_probs(labels: np.ndarray, probs: np.ndarray, *, where: str) -> DetectionResult:
    """Confident learning's result on out-of-sample class probabilities ``probs`` (n, C) of the given ``labels``:
    the detector's own decision, and ``labelsieve audit --pred-probs`` (probabilities from the user's model);
    ``where`` says where the probabilities come from, for the rule in audit.json."""
    flags = prune_by_noise_rate(labels, probs)
    return DetectionResult(
        p_clean=given_label_prob(probs, labels), probs=probs, threshold=0.5, flags=flags,
        rule=f"p_clean = {where} probability of the given label; the flag is confident learning's "
             "prune-by-noise-rate decision (not a threshold on p_clean).",
        info={"confident_joint": confident_joint(labels, probs).tolist()},
    )
