"""Linear probes on cached features: the cheap classifier behind confident learning, TURN's step 1,
the small-loss and GMM baselines.

Inputs are L2-normalised features; the probe is ``logits = scale * (x @ W.T) + b`` with a fixed
``scale`` (CLIP's 100 by default: a linear head on unit vectors needs large logits), trained with
AdamW and a cosine schedule in mini-batches, so it runs the same on 1k or 10M rows, on CPU or GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold

from labelsieve.core.errors import check_param
from labelsieve.detectors.common.base import DetectionContext
from labelsieve.detectors.common.losses import gce_loss


class Rows:
    """Rows of L2-normalised features, fetched on demand: from an in-memory array, or from a
    :class:`~labelsieve.detectors.common.base.DetectionContext` (a float16 memory map read a batch at a time), so
    a probe trains on 10M rows without a float32 copy of them. ``Rows(x)[idx]`` is float32 (len(idx), d)."""

    def __init__(self, source: Any, index: np.ndarray | None = None) -> None:
        self.source = source.source if isinstance(source, Rows) else source
        base = source.index if isinstance(source, Rows) else None
        if index is not None:
            index = np.asarray(index, dtype=np.int64)
            index = base[index] if base is not None else index
        else:
            index = base
        self.index = index
        n_all = self.source.n_samples if hasattr(self.source, "feature_rows") else len(self.source)
        self.n = len(index) if index is not None else n_all

    @staticmethod
    def of(ctx: DetectionContext) -> Any:
        """The features of ``ctx`` for a probe: the in-memory float32 matrix when it fits
        (:meth:`~labelsieve.detectors.common.base.DetectionContext.fits_in_memory`), else :class:`Rows`."""
        return ctx.features() if ctx.fits_in_memory() else Rows(ctx)

    def __len__(self) -> int:
        return self.n

    def subset(self, idx: np.ndarray) -> Rows:
        return Rows(self, idx)

    def __getitem__(self, idx: np.ndarray | slice) -> np.ndarray:
        rows = np.arange(self.n)[idx] if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64)
        if self.index is not None:
            rows = self.index[rows]
        if hasattr(self.source, "feature_rows"):
            return self.source.feature_rows(rows)
        return np.asarray(self.source[rows], dtype=np.float32)


@dataclass
class LinearProbe:
    """A trained linear head (weights on CPU)."""

    weight: torch.Tensor  # (C, d)
    bias: torch.Tensor  # (C,)
    scale: float

    def logits(self, x: Any, *, batch_size: int = 65536) -> np.ndarray:
        """Float32 logits (n, C) for features ``x`` (n, d): an array, or :class:`Rows`."""
        out = np.empty((len(x), self.weight.shape[0]), dtype=np.float32)
        for i in range(0, len(x), batch_size):
            xb = torch.as_tensor(np.asarray(x[i : i + batch_size], dtype=np.float32))
            out[i : i + len(xb)] = (self.scale * xb @ self.weight.T + self.bias).numpy()
        return out

    def probs(self, x: Any, *, batch_size: int = 65536) -> np.ndarray:
        """Softmax probabilities (n, C), float32, computed a block at a time."""
        out = np.empty((len(x), self.weight.shape[0]), dtype=np.float32)
        for i in range(0, len(x), batch_size):
            lg = torch.as_tensor(self.logits(x[i : i + batch_size]))
            out[i : i + len(lg)] = torch.softmax(lg.double(), dim=1).numpy()
        return out


def fit_linear_probe(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "ce",
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    scale: float = 100.0,
    init: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> LinearProbe:
    """Train a linear probe.

    Parameters
    ----------
    x : ndarray of shape (n, d), or Rows
        L2-normalised features (:class:`Rows` reads them a batch at a time).
    y : ndarray of shape (n,)
        Targets in ``[0, n_classes)``.
    loss : {"ce", "gce"} or callable
        ``"gce"`` is the generalised cross-entropy with q = 0.7 (TURN); a callable gets
        ``(logits, targets)`` and returns per-sample losses.
    init : ndarray of shape (C, d), optional
        Initial weights (e.g. zero-shot text embeddings); zeros otherwise.
    sample_weight : ndarray of shape (n,), optional
    """
    check_param("fit_linear_probe", "epochs", epochs, isinstance(epochs, int) and epochs >= 1, "an int >= 1")
    check_param("fit_linear_probe", "lr", lr, lr > 0, "a float > 0")
    if isinstance(loss, str):
        check_param("fit_linear_probe", "loss", loss, loss in ("ce", "gce"), "'ce', 'gce' or a callable")
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    X = x if isinstance(x, Rows) else torch.as_tensor(np.asarray(x, dtype=np.float32))
    Y = torch.as_tensor(np.asarray(y, dtype=np.int64))
    d = X[np.arange(1)].shape[1] if isinstance(X, Rows) else X.shape[1]
    Wt = torch.as_tensor(init, dtype=torch.float32).clone() if init is not None else torch.zeros(n_classes, d)
    W = torch.nn.Parameter(Wt.to(dev))
    b = torch.nn.Parameter(torch.zeros(n_classes, device=dev))
    opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=weight_decay)
    n = len(X)
    steps = epochs * max(1, (n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    sw = torch.as_tensor(sample_weight, dtype=torch.float32) if sample_weight is not None else None
    if callable(loss):
        loss_fn = loss
    elif loss == "gce":
        loss_fn = lambda lg, t: gce_loss(lg, t, q=0.7, reduction="none")
    else:
        loss_fn = lambda lg, t: F.cross_entropy(lg, t, reduction="none")
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            xb = torch.as_tensor(X[np.sort(idx.numpy())] if isinstance(X, Rows) else X[idx]).to(dev)
            yb = (Y[np.sort(idx.numpy())] if isinstance(X, Rows) else Y[idx]).to(dev)
            per = loss_fn(scale * xb @ W.T + b, yb)
            if sw is not None:
                wb = (sw[np.sort(idx.numpy())] if isinstance(X, Rows) else sw[idx]).to(dev)
                lossv = (per * wb).sum() / wb.sum().clamp_min(1e-12)
            else:
                lossv = per.mean()
            opt.zero_grad(set_to_none=True)
            lossv.backward()
            opt.step()
            sched.step()
    return LinearProbe(weight=W.detach().cpu(), bias=b.detach().cpu(), scale=scale)


def out_of_fold_probs(
    x: Any, y: np.ndarray, n_classes: int, *, folds: int = 5, seed: int = 0, **probe_kw: Any
) -> np.ndarray:
    """Out-of-fold class probabilities (n, C), float32, from a stratified K-fold linear probe: each sample is
    scored by a probe that never saw it. ``x``: an array or :class:`Rows`."""
    counts = np.bincount(y, minlength=n_classes)
    k = int(min(folds, max(2, counts[counts > 0].min())))
    probs = np.zeros((len(y), n_classes), dtype=np.float32)
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    rows = x if isinstance(x, Rows) else None
    for f, (tr, te) in enumerate(skf.split(np.zeros(len(y)), y)):
        xtr, xte = (rows.subset(tr), rows.subset(te)) if rows is not None else (x[tr], x[te])
        probe = fit_linear_probe(xtr, y[tr], n_classes, seed=seed + f, **probe_kw)
        probs[te] = probe.probs(xte)
    return probs


def oof_probe_losses(ctx: DetectionContext, *, folds: int, epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold linear-probe cross-entropy of the given labels and the class probabilities.

    Parameters
    ----------
    ctx : DetectionContext
        Its cached features, labels, seed and device are used.
    folds : int
        Stratified folds (reduced to the smallest class size when a class has fewer, at least 2).
    epochs : int
        Probe epochs per fold.

    Returns
    -------
    losses : ndarray of shape (n,), float64, finite
    probs : ndarray of shape (n, C), float32
    """
    labels = np.asarray(ctx.labels, dtype=np.int64)
    probs = out_of_fold_probs(Rows.of(ctx), labels, ctx.n_classes, folds=folds, seed=ctx.seed, epochs=epochs,
                              device=ctx.device)
    p_given = probs[np.arange(len(labels)), labels]
    return -np.log(np.clip(p_given, 1e-12, 1.0)), probs
