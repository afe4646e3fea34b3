"""Loss functions shared by the detectors and the training engine.

Every function takes ``logits`` of shape (N, C) (any floating dtype; half precision is computed in
float32) and integer ``targets`` of shape (N,), and a ``reduction`` of ``"mean"`` (default), ``"sum"``
or ``"none"`` (per-sample losses of shape (N,)). All are written with log-softmax / log-sigmoid so
that they stay finite and differentiable for extreme logits (e.g. ±1e4), and the mean of an empty
batch is 0 (not NaN), so that an empty clean selection never poisons a training step.

:func:`get_loss` builds a training loss by name (``"ce"``, ``"gce"``, ``"sce"``, ``"elr"``) with one
calling convention, ``loss(logits, targets, index=None)``; ``index`` holds the dataset indices of the
batch and is needed by ELR only.

References
----------
- Zhang & Sabuncu, "Generalized Cross Entropy Loss for Training Deep Neural Networks with Noisy
  Labels", NeurIPS 2018 (GCE).
- Wang et al., "Symmetric Cross Entropy for Robust Learning with Noisy Labels", ICCV 2019 (SCE).
- Liu et al., "Early-Learning Regularization Prevents Memorization of Noisy Labels", NeurIPS 2020
  (ELR).
- Kim et al., "NLNL: Negative Learning for Noisy Labels", ICCV 2019 (complementary labels).
- Wei et al., "Vision-Language Models are Strong Noisy Label Detectors", NeurIPS 2024 (DEFT's
  dual prompts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from labelsieve.core.errors import ParameterError, check_param

__all__ = [
    "LOSSES",
    "ELRLoss",
    "NamedLoss",
    "complementary_nll",
    "cross_entropy",
    "deft_dual_loss",
    "gce_loss",
    "get_loss",
    "sce_loss",
]

REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- helpers


def _check_reduction(owner: str, reduction: str) -> None:
    check_param(owner, "reduction", reduction, reduction in REDUCTIONS, f"one of {REDUCTIONS}")


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else x


def _as_float(x: Tensor) -> Tensor:
    """Half-precision inputs are computed in float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _prepare(owner: str, logits: Tensor, targets: Tensor, name: str = "targets") -> tuple[Tensor, Tensor]:
    """Validate shapes and dtypes; return logits in at least float32 and targets as int64."""
    check_param(owner, "logits", _shape(logits),
                isinstance(logits, Tensor) and logits.ndim == 2 and logits.is_floating_point(),
                "a floating tensor of shape (N, C)")
    check_param(owner, name, _shape(targets),
                isinstance(targets, Tensor) and targets.ndim == 1 and targets.shape[0] == logits.shape[0]
                and not targets.is_floating_point() and targets.dtype != torch.bool,
                f"an integer tensor of shape (N,) with N = {logits.shape[0]} (the rows of logits)")
    n_classes = logits.shape[1]
    # Range check where it costs no device synchronisation; on accelerators gather() asserts itself.
    if targets.device.type == "cpu" and targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        check_param(owner, name, (lo, hi), lo >= 0 and hi < n_classes,
                    f"class indices in [0, {n_classes - 1}] (got min and max)")
    return _as_float(logits), targets.long()


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    """Reduce per-sample losses; the mean of an empty batch is 0 (still attached to the graph)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(loss.shape[0], 1)


def _log_p_target(logits: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(logits)[i, targets[i]]``, shape (N,)."""
    return F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)


# --------------------------------------------------------------------------- losses


def cross_entropy(logits: Tensor, targets: Tensor, *, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy, ``-log p_y``.

    Parameters
    ----------
    logits : Tensor of shape (N, C)
    targets : int Tensor of shape (N,)
        Class indices in ``[0, C)``.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"none"`` returns the per-sample losses, shape (N,).

    Returns
    -------
    Tensor
        Scalar, or shape (N,) for ``reduction="none"``.
    """
    _check_reduction("cross_entropy", reduction)
    logits, targets = _prepare("cross_entropy", logits, targets)
    return _reduce(-_log_p_target(logits, targets), reduction)


def gce_loss(logits: Tensor, targets: Tensor, *, q: float = 0.7, reduction: str = "mean") -> Tensor:
    """Generalised cross-entropy (Zhang & Sabuncu 2018), ``(1 - p_y^q) / q``.

    ``q -> 0`` gives cross-entropy, ``q = 1`` the mean absolute error ``1 - p_y``; TURN trains its
    linear probe with ``q = 0.7``. Computed as ``-expm1(q * log p_y) / q``, so it is exact and finite
    for any logits; the loss is bounded by ``1 / q``.

    Parameters
    ----------
    logits : Tensor of shape (N, C)
    targets : int Tensor of shape (N,)
    q : float in (0, 1], default 0.7
    reduction : {"mean", "sum", "none"}, default "mean"

    Returns
    -------
    Tensor
        Scalar, or shape (N,) for ``reduction="none"``.
    """
    _check_reduction("gce_loss", reduction)
    check_param("gce_loss", "q", q, isinstance(q, (int, float)) and 0.0 < q <= 1.0, "a float in (0, 1]")
    logits, targets = _prepare("gce_loss", logits, targets)
    loss = -torch.expm1(q * _log_p_target(logits, targets)) / q
    return _reduce(loss, reduction)


def sce_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float = 0.1,
    beta: float = 1.0,
    log_clip: float = -4.0,
    reduction: str = "mean",
) -> Tensor:
    """Symmetric cross-entropy (Wang et al. 2019), ``alpha * CE + beta * RCE``.

    The reverse cross-entropy ``RCE = -sum_k p_k log q_k`` uses the one-hot label ``q`` with
    ``log 0`` clamped to ``A = log_clip``, so ``RCE = -A * (1 - p_y)``. The paper uses ``A = -4``
    (the default); the authors' code clamps the one-hot to 1e-4, i.e. ``A = log(1e-4) ≈ -9.21`` —
    pass ``log_clip=math.log(1e-4)`` to match it. ``1 - p_y`` is computed as
    ``-expm1(log p_y)`` (exact for any logits).

    Parameters
    ----------
    logits : Tensor of shape (N, C)
    targets : int Tensor of shape (N,)
    alpha : float >= 0, default 0.1
        Weight of CE (0.1 is the paper's CIFAR-10 setting).
    beta : float >= 0, default 1.0
        Weight of RCE.
    log_clip : float < 0, default -4.0
        The value taken for ``log 0``.
    reduction : {"mean", "sum", "none"}, default "mean"

    Returns
    -------
    Tensor
        Scalar, or shape (N,) for ``reduction="none"``.
    """
    _check_reduction("sce_loss", reduction)
    check_param("sce_loss", "alpha", alpha, isinstance(alpha, (int, float)) and alpha >= 0, "a float >= 0")
    check_param("sce_loss", "beta", beta, isinstance(beta, (int, float)) and beta >= 0, "a float >= 0")
    check_param("sce_loss", "log_clip", log_clip, isinstance(log_clip, (int, float)) and log_clip < 0,
                "a float < 0 (the value used for log 0)")
    logits, targets = _prepare("sce_loss", logits, targets)
    log_py = _log_p_target(logits, targets)
    rce = -log_clip * -torch.expm1(log_py)
    return _reduce(alpha * -log_py + beta * rce, reduction)


def complementary_nll(logits: Tensor, comp_targets: Tensor, *, reduction: str = "mean") -> Tensor:
    """Negative-learning loss for complementary labels, ``-log(1 - p_c)``.

    ``comp_targets[i]`` is a class sample ``i`` does *not* belong to. ``log(1 - p_c)`` is computed
    as ``logsumexp`` over the other classes minus ``logsumexp`` over all classes, exact and finite
    for any logits.

    Parameters
    ----------
    logits : Tensor of shape (N, C), C >= 2
    comp_targets : int Tensor of shape (N,)
        Complementary class indices in ``[0, C)``.
    reduction : {"mean", "sum", "none"}, default "mean"

    Returns
    -------
    Tensor
        Scalar, or shape (N,) for ``reduction="none"``.
    """
    _check_reduction("complementary_nll", reduction)
    logits, comp = _prepare("complementary_nll", logits, comp_targets, name="comp_targets")
    check_param("complementary_nll", "logits", tuple(logits.shape), logits.shape[1] >= 2,
                "of shape (N, C) with C >= 2 classes")
    others = torch.ones_like(logits, dtype=torch.bool).scatter_(1, comp[:, None], False)
    log_rest = torch.logsumexp(logits.masked_fill(~others, float("-inf")), dim=1)
    loss = torch.logsumexp(logits, dim=1) - log_rest
    return _reduce(loss, reduction)


def deft_dual_loss(pos_logits: Tensor, neg_logits: Tensor, targets: Tensor, comp_targets: Tensor, *,
                   positive_weight: float = 1.0, clamp: float = 1e-5) -> Tensor:
    """DEFT's dual-prompt loss L_dp, as the authors compute it (``main_phase1.py`` L53-L74).

    For every sample and class a two-way softmax over the positive and the negative prompt's logit
    gives ``p_yes = softmax([pos, neg])[0]`` and ``p_no = 1 - p_yes``. With the probabilities clamped to
    ``[clamp, 1]`` before the log (so each term is at most ``-log clamp`` and stops giving gradient
    below it)::

        L_dp = mean_i[-log p_no(i, comp_i)] + positive_weight · mean_i[-log p_yes(i, target_i)]

    two batch means added, not one mean over the 2N terms. The positive logits are **detached**
    here (the authors' ``pos_outputs.detach()``): L_dp never moves the positive prompt, nor the image
    side through the positive logits. Pass negative logits computed on detached image features to
    keep L_dp off the image side altogether, as the authors do (``image_features.detach()``).

    Parameters
    ----------
    pos_logits, neg_logits : Tensor of shape (N, C)
        ``s · cos(image, positive prompt of class k)`` and the same for the negative prompts.
    targets : int Tensor of shape (N,)
        The "yes" class per sample (the given label, or a pseudo-label).
    comp_targets : int Tensor of shape (N,)
        The "no" class per sample (a complementary label).
    positive_weight : float >= 0, default 1.0
        Weight of the "yes" term: 1 in the authors' code; the paper's severe-noise setting uses 0.25.
    clamp : float in (0, 1), default 1e-5
        Floor of the probabilities before the log (the authors').

    Returns
    -------
    Tensor
        Scalar; 0 (attached to the graph) for an empty batch.
    """
    owner = "deft_dual_loss"
    check_param(owner, "pos_logits", _shape(pos_logits),
                isinstance(pos_logits, Tensor) and isinstance(neg_logits, Tensor) and pos_logits.ndim == 2
                and pos_logits.shape == neg_logits.shape and pos_logits.is_floating_point(),
                f"a floating tensor of shape (N, C), the shape of neg_logits {_shape(neg_logits)}")
    check_param(owner, "positive_weight", positive_weight,
                isinstance(positive_weight, (int, float)) and positive_weight >= 0, "a float >= 0")
    check_param(owner, "clamp", clamp, isinstance(clamp, float) and 0.0 < clamp < 1.0, "a float in (0, 1)")
    pos, targets = _prepare(owner, pos_logits.detach(), targets)
    _, comp = _prepare(owner, pos, comp_targets, name="comp_targets")
    pair = torch.stack([pos, _as_float(neg_logits)], dim=-1)  # (N, C, 2)
    p = F.softmax(pair, dim=-1).clamp(min=clamp, max=1.0)
    log_yes, log_no = torch.log(p[..., 0]), torch.log(p[..., 1])
    no_term = -log_no.gather(1, comp[:, None]).squeeze(1)
    yes_term = -log_yes.gather(1, targets[:, None]).squeeze(1)
    return _reduce(no_term, "mean") + positive_weight * _reduce(yes_term, "mean")


class ELRLoss(torch.nn.Module):
    """Early-learning regularisation (Liu et al. 2020): ``CE + lam * log(1 - <t_i, p_i>)``.

    ``t_i`` is a per-sample running average of the model's (detached) predictions,
    ``t_i <- beta * t_i + (1 - beta) * p_i``, updated on every forward call in training mode
    (``module.train()``, the default) and left alone in eval mode. As in the authors' code, ``p`` is
    clamped to ``[1e-4, 1 - 1e-4]`` (and renormalised for the target update), which keeps the log
    finite. The targets live in a buffer, so ``.to(device)`` and ``state_dict()`` carry them.

    Parameters
    ----------
    num_samples : int >= 1
        Dataset size; ``index`` values must lie in ``[0, num_samples)``.
    num_classes : int >= 2
    beta : float in [0, 1), default 0.7
        Momentum of the target average.
    lam : float >= 0, default 3.0
        Weight of the regulariser.
    reduction : {"mean", "sum", "none"}, default "mean"
    """

    target: Tensor

    def __init__(self, num_samples: int, num_classes: int, *, beta: float = 0.7, lam: float = 3.0,
                 reduction: str = "mean") -> None:
        super().__init__()
        check_param("ELRLoss", "num_samples", num_samples, isinstance(num_samples, int) and num_samples >= 1,
                    "an int >= 1")
        check_param("ELRLoss", "num_classes", num_classes, isinstance(num_classes, int) and num_classes >= 2,
                    "an int >= 2")
        check_param("ELRLoss", "beta", beta, isinstance(beta, (int, float)) and 0.0 <= beta < 1.0,
                    "a float in [0, 1)")
        check_param("ELRLoss", "lam", lam, isinstance(lam, (int, float)) and lam >= 0, "a float >= 0")
        _check_reduction("ELRLoss", reduction)
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.beta = float(beta)
        self.lam = float(lam)
        self.reduction = reduction
        self.register_buffer("target", torch.zeros(num_samples, num_classes))

    def forward(self, logits: Tensor, targets: Tensor, index: Tensor | None = None) -> Tensor:
        """Loss of a batch.

        Parameters
        ----------
        logits : Tensor of shape (N, num_classes)
        targets : int Tensor of shape (N,)
        index : int Tensor of shape (N,)
            Dataset index of each sample of the batch (required).

        Returns
        -------
        Tensor
            Scalar, or shape (N,) for ``reduction="none"``.
        """
        logits, targets = _prepare("ELRLoss", logits, targets)
        check_param("ELRLoss", "logits", tuple(logits.shape), logits.shape[1] == self.num_classes,
                    f"of shape (N, {self.num_classes}) (num_classes)")
        check_param("ELRLoss", "index", _shape(index),
                    isinstance(index, Tensor) and index.ndim == 1 and index.shape[0] == logits.shape[0]
                    and not index.is_floating_point(),
                    "an integer tensor of shape (N,) with the dataset index of each sample")
        assert index is not None
        if index.device.type == "cpu" and index.numel():
            lo, hi = int(index.min()), int(index.max())
            check_param("ELRLoss", "index", (lo, hi), lo >= 0 and hi < self.num_samples,
                        f"indices in [0, {self.num_samples - 1}] (got min and max)")
        index = index.long().to(self.target.device)
        y_pred = F.softmax(logits, dim=1).clamp(1e-4, 1.0 - 1e-4)
        if self.training:
            with torch.no_grad():
                p = y_pred.detach().to(self.target.dtype)
                self.target[index] = self.beta * self.target[index] + (1.0 - self.beta) * (
                    p / p.sum(dim=1, keepdim=True))
        t = self.target[index].to(y_pred.dtype)
        reg = torch.log1p(-(t * y_pred).sum(dim=1))
        loss = -_log_p_target(logits, targets) + self.lam * reg
        return _reduce(loss, self.reduction)

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, num_classes={self.num_classes}, beta={self.beta}, "
                f"lam={self.lam}, reduction={self.reduction!r}")


# --------------------------------------------------------------------------- registry


class NamedLoss:
    """A per-batch loss with the one calling convention ``loss(logits, targets, index=None)``.

    Built by :func:`get_loss` for the stateless losses; ``index`` is accepted and ignored.
    """

    def __init__(self, name: str, fn: Callable[..., Tensor], params: dict[str, Any]) -> None:
        self.name = name
        self.fn = fn
        self.params = dict(params)

    def __call__(self, logits: Tensor, targets: Tensor, index: Tensor | None = None) -> Tensor:
        return self.fn(logits, targets, **self.params)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"NamedLoss({self.name!r}{', ' if params else ''}{params})"


LOSSES: dict[str, Callable[..., Any]] = {
    "ce": cross_entropy,
    "gce": gce_loss,
    "sce": sce_loss,
    "elr": ELRLoss,
}

_ALLOWED_KW: dict[str, tuple[str, ...]] = {
    "ce": ("reduction",),
    "gce": ("q", "reduction"),
    "sce": ("alpha", "beta", "log_clip", "reduction"),
    "elr": ("num_samples", "num_classes", "beta", "lam", "reduction"),
}


def get_loss(name: str, **kw: Any) -> NamedLoss | ELRLoss:
    """Build a training loss by name.

    Parameters
    ----------
    name : {"ce", "gce", "sce", "elr"}
    **kw
        The loss's keyword options: ``reduction`` for all; ``q`` for gce; ``alpha``, ``beta``,
        ``log_clip`` for sce; ``num_samples`` and ``num_classes`` (required), ``beta``, ``lam`` for
        elr. Unknown options raise :class:`~labelsieve.core.errors.ParameterError`.

    Returns
    -------
    callable ``(logits, targets, index=None) -> Tensor``
        A :class:`NamedLoss` for the stateless losses, an :class:`ELRLoss` module (which needs
        ``index``) for ``"elr"``. Values are validated here, not at the first batch.
    """
    check_param("get_loss", "name", name, name in LOSSES, f"one of {', '.join(repr(k) for k in LOSSES)}")
    allowed = _ALLOWED_KW[name]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ParameterError(
            f"The loss {name!r} takes the option(s) {', '.join(allowed)}; got unknown option(s) "
            f"{', '.join(unknown)}."
        )
    if name == "elr":
        missing = [k for k in ("num_samples", "num_classes") if k not in kw]
        if missing:
            raise ParameterError(f"The loss 'elr' needs {' and '.join(missing)} (the dataset size and the "
                                 "number of classes).")
        return ELRLoss(kw.pop("num_samples"), kw.pop("num_classes"), **kw)
    # Validate the options now with a one-sample dummy batch rather than at the first real one.
    LOSSES[name](torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), **kw)
    return NamedLoss(name, LOSSES[name], kw)
