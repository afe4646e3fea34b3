"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score


def inject_symmetric(labels: np.ndarray, n_classes: int, rate: float, seed: int = 0) -> np.ndarray:
    """Flip exactly round(rate * n) labels, each to a different class chosen uniformly."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    idx = rng.choice(len(labels), size=round(rate * len(labels)), replace=False)
    r = rng.integers(0, n_classes - 1, size=len(idx))
    out[idx] = r + (r >= labels[idx])
    return out


def scores(result, noisy_true: np.ndarray) -> tuple[float, float]:
    """(F1 of the flag, AUROC of 1 - p_clean) with noisy samples as positives."""
    return (float(f1_score(noisy_true, result.is_noisy)), float(roc_auc_score(noisy_true, 1 - result.p_clean)))


def make_context(images, feats, encoder, labels=None, seed=0):
    """A DetectionContext over cached features with (possibly noisy) ``labels``."""
    import torch

    from labelsieve.detectors.base import DetectionContext

    labels = images.labels if labels is None else labels
    imgs = images.subset(np.arange(len(images)))
    imgs.labels = np.asarray(labels, dtype=np.int64)
    return DetectionContext(labels=imgs.labels, classnames=images.classnames, images=imgs, encoder=encoder,
                            features_fn=lambda: feats, device=torch.device("cpu"), seed=seed, progress=False)
