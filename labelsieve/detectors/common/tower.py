"""Full fine-tuning of an encoder's image tower with a linear head: what TURN's FFT phase and the ``gmm``
detector's ``source="finetune"`` share (the tower is always a copy; the encoder is never changed)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labelsieve.core import distributed
from labelsieve.core.defaults import default_num_workers
from labelsieve.core.engine import Trainer, freeze_batchnorm, make_loader
from labelsieve.core.errors import check_param
from labelsieve.core.optim import cosine_schedule, make_optimizer
from labelsieve.core.runtime import check_amp
from labelsieve.data.imagecache import CachedImageDataset, DecodedImageCache
from labelsieve.data.transforms import eval_transform, train_transform
from labelsieve.detectors.common.base import DetectionContext
from labelsieve.detectors.common.linear_probe import LinearProbe
from labelsieve.models.encoders import Encoder

__all__ = ["FINETUNE_DEFAULTS", "FineTuneSetup", "TowerClassifier", "ce_losses", "check_finetune_params",
           "evaluate_losses", "finetune_trainer", "image_tower", "n_params", "prepare_finetune"]

#: Fine-tuning settings shared by TURN and ``gmm(source="finetune")``, with their defaults: SGD, momentum
#: 0.9, weight decay 5e-4, batch 64, learning rate 1e-3 for the tower and 1e-2 for the head, the
#: encoder's input size, frozen BatchNorm statistics, automatic mixed precision, default workers.
FINETUNE_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "head_lr": 1e-2, "momentum": 0.9, "weight_decay": 5e-4,
                                     "batch_size": 64, "image_size": None, "freeze_bn": True, "amp": "auto",
                                     "num_workers": None}


def is_pos_int(v: object, lo: int = 1) -> bool:
    """An int (not a bool) >= ``lo``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def is_pos_float(v: object) -> bool:
    """A finite number (not a bool) > 0."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_finetune_params(owner: str, **params: Any) -> dict[str, Any]:
    """Validate the fine-tuning parameters (the keys of :data:`FINETUNE_DEFAULTS`) in the project's one
    message format and return them normalised (floats as floats)."""
    check_param(owner, "parameters", sorted(params), set(params) == set(FINETUNE_DEFAULTS),
                f"exactly {sorted(FINETUNE_DEFAULTS)}")
    for name in ("lr", "head_lr"):
        check_param(owner, name, params[name], is_pos_float(params[name]), "a float > 0")
    m, wd = params["momentum"], params["weight_decay"]
    check_param(owner, "momentum", m, isinstance(m, (int, float)) and 0.0 <= m < 1.0, "a float in [0, 1)")
    check_param(owner, "weight_decay", wd, isinstance(wd, (int, float)) and wd >= 0, "a float >= 0")
    check_param(owner, "batch_size", params["batch_size"], is_pos_int(params["batch_size"], 2), "an int >= 2")
    size = params["image_size"]
    check_param(owner, "image_size", size, size is None or is_pos_int(size, 16), "None or an int >= 16")
    check_param(owner, "freeze_bn", params["freeze_bn"], isinstance(params["freeze_bn"], bool), "True or False")
    check_amp(owner, params["amp"])
    w = params["num_workers"]
    check_param(owner, "num_workers", w, w is None or is_pos_int(w, 0), "None or an int >= 0")
    return {**params, "lr": float(params["lr"]), "head_lr": float(params["head_lr"]), "momentum": float(m),
            "weight_decay": float(wd)}


def image_tower(encoder: Encoder) -> nn.Module:
    """The image tower of ``encoder``: images (B, 3, H, W) -> embeddings (B, D), not normalised.

    ``encoder.model.visual`` for open_clip models (what ``encode_image`` calls), the timm model itself
    (built with ``num_classes=0``) for timm encoders.
    """
    return encoder.model.visual if encoder.kind == "open_clip" else encoder.model


class TowerClassifier(nn.Module):
    """An image tower and a linear head on its L2-normalised output: images -> logits.

    Parameters
    ----------
    tower : nn.Module
        Images (B, 3, H, W) -> embeddings (B, D).
    weight : Tensor of shape (C, D)
    bias : Tensor of shape (C,)
        Initial head; :meth:`from_probe` sets them so that the model equals a
        :class:`~labelsieve.detectors.common.linear_probe.LinearProbe` on the tower's normalised embeddings.
    freeze_bn : bool, default=True
        Keep every BatchNorm layer in evaluation mode during training: its running statistics are
        used and not updated, its affine weights still train. Small fine-tuning batches otherwise
        replace the pre-trained statistics with noisy batch ones (on the mini CLIP's EfficientNet
        tower at batch 16 this took the accuracy from 0.65 to 0.50 in one epoch; frozen, to 0.72).
    """

    def __init__(self, tower: nn.Module, weight: torch.Tensor, bias: torch.Tensor, *,
                 freeze_bn: bool = True) -> None:
        super().__init__()
        self.tower = tower
        self.freeze_bn = freeze_bn
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)

    @classmethod
    def from_probe(cls, tower: nn.Module, probe: LinearProbe, *, freeze_bn: bool = True) -> TowerClassifier:
        """``head(z) = probe.scale * z @ W.T + b``, the probe's logits on normalised embeddings ``z``."""
        return cls(tower, probe.scale * probe.weight.float(), probe.bias.float(), freeze_bn=freeze_bn)

    def train(self, mode: bool = True) -> TowerClassifier:
        """Set training mode, leaving BatchNorm layers in evaluation mode when ``freeze_bn``."""
        super().train(mode)
        if mode and self.freeze_bn:
            freeze_batchnorm(self)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.tower(x).float(), dim=-1))


def ce_losses(logits: np.ndarray, labels: np.ndarray, *, block: int = 1 << 16) -> np.ndarray:
    """Per-sample cross-entropy ``-log softmax(logits)[i, labels[i]]`` (float64, finite), computed in float64 a
    block of rows at a time (float32 logits of 10M rows x 100 classes are never copied whole to float64)."""
    labels = np.asarray(labels)
    out = np.empty(len(labels), dtype=np.float64)
    for i in range(0, len(labels), block):
        z = np.asarray(logits[i : i + block], dtype=np.float64)
        z = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        out[i : i + len(z)] = lse - z[np.arange(len(z)), labels[i : i + block]]
    return out


@dataclass
class FineTuneSetup:
    """Decoded images and loaders for full fine-tuning of an image tower.

    Attributes
    ----------
    cache : DecodedImageCache
        The images decoded once at ``image_size``.
    labels : ndarray of shape (n,)
    image_size : int
    batch_size : int
    num_workers : int
    train_transform : callable
        The training view (random resized crop + horizontal flip by default) + the model's normalisation.
    eval_loader : DataLoader
        Every sample once, centre crop, in order.
    """

    cache: DecodedImageCache
    labels: np.ndarray
    image_size: int
    batch_size: int
    num_workers: int
    train_transform: Callable[[torch.Tensor], torch.Tensor]
    eval_loader: torch.utils.data.DataLoader

    def train_loader(self, index: np.ndarray, *, seed: int) -> torch.utils.data.DataLoader:
        """A shuffled loader over the samples ``index`` (augmented), its order drawn from ``seed``.

        The last batch is dropped only when it would hold a single image (BatchNorm cannot train on
        one sample).
        """
        ds = CachedImageDataset(self.cache, index=index, labels=self.labels, transform=self.train_transform)
        drop_last = len(index) > self.batch_size and len(index) % self.batch_size == 1
        return make_loader(ds, batch_size=self.batch_size, shuffle=True, seed=seed, num_workers=self.num_workers,
                           drop_last=drop_last)


def prepare_finetune(ctx: DetectionContext, *, image_size: int | None, batch_size: int,
                     num_workers: int | None,
                     view: Callable[..., Callable[[torch.Tensor], torch.Tensor]] | None = None) -> FineTuneSetup:
    """Decode ``ctx.images`` once (or reopen the cache) and build the loaders for fine-tuning.

    Parameters
    ----------
    ctx : DetectionContext
    image_size : int or None
        Training/evaluation side in pixels; None: the encoder's input size. The cache is decoded at
        this size (shorter side resized, centre square), matching the encoder's own preprocessing.
    batch_size : int
    num_workers : int or None
        DataLoader workers; None: 0 on CPU (the transforms are cheap next to the model), else
        ``min(8, cpu_count)``.
    view : callable, optional
        ``view(size, mean=..., std=...)`` builds the training transform; default random resized crop + flip
        (:func:`~labelsieve.data.transforms.train_transform`).
    """
    enc = ctx.encoder
    size = int(image_size or enc.image_size)
    workers = num_workers if num_workers is not None else (0 if ctx.device.type == "cpu" else default_num_workers())
    # under torchrun (a detector on every rank) rank 0 decodes while the others wait, then they open it
    cache = distributed.main_first(DecodedImageCache.from_images, ctx.images, size=size, cache_dir=ctx.cache_dir,
                                   progress=ctx.progress, num_workers=workers)
    labels = np.asarray(ctx.labels, dtype=np.int64)
    eval_ds = CachedImageDataset(cache, labels=labels, transform=eval_transform(size, mean=enc.mean, std=enc.std))
    eval_loader = make_loader(eval_ds, batch_size=max(128, 2 * batch_size), num_workers=workers)
    return FineTuneSetup(cache=cache, labels=labels, image_size=size, batch_size=batch_size, num_workers=workers,
                         train_transform=(view or train_transform)(size, mean=enc.mean, std=enc.std),
                         eval_loader=eval_loader)


def finetune_trainer(model: TowerClassifier, *, lr: float, head_lr: float, momentum: float, weight_decay: float,
                     epochs: int, device: torch.device, amp: str, progress: bool, desc: str,
                     optimizer: str = "sgd") -> Trainer:
    """A :class:`~labelsieve.core.engine.Trainer` for full fine-tuning of ``model``.

    ``optimizer`` (SGD with ``momentum``, or AdamW) over two parameter groups (tower at ``lr``, head at
    ``head_lr``), cosine decay over ``epochs`` stepped once per epoch (the number of steps per epoch
    may change between epochs). Every tower parameter is made trainable (the encoder may have frozen
    them).
    """
    for p in model.parameters():
        p.requires_grad_(True)
    groups = [{"params": list(model.tower.parameters()), "lr": lr},
              {"params": list(model.head.parameters()), "lr": head_lr}]
    opt = make_optimizer(groups, name=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum)
    sched = cosine_schedule(opt, epochs=epochs, steps_per_epoch=1)
    return Trainer(model, optimizer=opt, scheduler=sched, scheduler_interval="epoch", device=device, amp=amp,
                   progress=progress, desc=desc)


def evaluate_losses(trainer: Trainer, setup: FineTuneSetup) -> tuple[np.ndarray, np.ndarray, int]:
    """One evaluation pass: (CE losses (n,), logits (n, C), number of unreadable images).

    Unreadable images (never expected here: the context holds readable images only) get the
    largest loss and uniform logits, so they are never selected as clean and never produce NaN.
    """
    ev = trainer.evaluate(setup.eval_loader, targets=setup.labels)
    losses = np.asarray(ev["losses"], dtype=np.float64)
    bad = ~np.isfinite(losses)
    if bad.any():
        losses[bad] = float(np.max(losses[~bad])) if (~bad).any() else 0.0
    return losses, np.asarray(ev["logits"], dtype=np.float64), int(bad.sum())


def n_params(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))
