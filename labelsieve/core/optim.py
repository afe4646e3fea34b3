"""Optimisers and learning-rate schedules every trainer builds the same way."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from labelsieve.core.errors import ParameterError, check_param

__all__ = ["cosine_schedule", "make_optimizer"]


def make_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]] | nn.Module,
    *,
    name: str = "sgd",
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over the trainable parameters.

    Parameters
    ----------
    params : nn.Module, iterable of Parameter, or iterable of param-group dicts
        A module means its parameters with ``requires_grad``; frozen parameters are skipped.
    name : {"sgd", "adamw"}
    lr : float
        Learning rate (> 0).
    weight_decay : float
        Decoupled (AdamW) or L2 (SGD) weight decay, applied to every parameter as in the papers'
        code.
    momentum : float
        SGD momentum (ignored by AdamW).

    Returns
    -------
    torch.optim.Optimizer
    """
    owner = "make_optimizer"
    key = name.lower() if isinstance(name, str) else name
    check_param(owner, "name", name, key in ("sgd", "adamw"), "'sgd' or 'adamw'")
    check_param(owner, "lr", lr, isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, "a float > 0")
    check_param(owner, "weight_decay", weight_decay,
                isinstance(weight_decay, (int, float)) and weight_decay >= 0, "a float >= 0")
    check_param(owner, "momentum", momentum, isinstance(momentum, (int, float)) and 0 <= momentum < 1,
                "a float in [0, 1)")
    if isinstance(params, nn.Module):
        groups: list[Any] = [p for p in params.parameters() if p.requires_grad]
    else:
        groups = []
        for p in params:
            if isinstance(p, dict):
                g = dict(p)
                g["params"] = [q for q in g["params"] if q.requires_grad]
                if g["params"]:
                    groups.append(g)
            elif p.requires_grad:
                groups.append(p)
    if not groups:
        raise ParameterError("make_optimizer got no trainable parameters (all have requires_grad=False).")
    if key == "sgd":
        return torch.optim.SGD(groups, lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay))
    return torch.optim.AdamW(groups, lr=float(lr), weight_decay=float(weight_decay))


def cosine_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning rate: linear warm-up, then cosine decay to ``min_lr_ratio * lr``.

    Step with the :class:`Trainer` (``scheduler_interval="step"``, the default). Step ``t`` of
    ``T = epochs * steps_per_epoch`` gets ``lr * f(t)`` with ``f`` rising linearly from ``1/W`` to 1
    over the ``W = warmup_epochs * steps_per_epoch`` warm-up steps, then
    ``min + (1 - min) * (1 + cos(pi * (t - W) / (T - W))) / 2``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    epochs : int
        Total epochs (>= 1).
    steps_per_epoch : int
        Optimizer steps per epoch (>= 1), usually ``len(train_loader)``.
    warmup_epochs : float
        Warm-up length in epochs (>= 0, < epochs).
    min_lr_ratio : float
        Final learning rate as a fraction of the initial one.

    Returns
    -------
    torch.optim.lr_scheduler.LambdaLR
    """
    owner = "cosine_schedule"
    check_param(owner, "epochs", epochs, isinstance(epochs, int) and epochs >= 1, "an int >= 1")
    check_param(owner, "steps_per_epoch", steps_per_epoch, isinstance(steps_per_epoch, int) and steps_per_epoch >= 1,
                "an int >= 1")
    check_param(owner, "warmup_epochs", warmup_epochs,
                isinstance(warmup_epochs, (int, float)) and 0 <= warmup_epochs < epochs, f"in [0, {epochs})")
    check_param(owner, "min_lr_ratio", min_lr_ratio,
                isinstance(min_lr_ratio, (int, float)) and 0 <= min_lr_ratio <= 1, "in [0, 1]")
    total = epochs * steps_per_epoch
    warm = int(round(warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
