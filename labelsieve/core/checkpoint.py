"""Checkpoints of a :class:`~labelsieve.core.engine.Trainer`: everything needed to resume after an epoch
(model, optimizer, scheduler, scaler, history, best weights, the method's state, RNG states), written
atomically, so an interrupted run continues with the same weights as an uninterrupted one."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from labelsieve.core.io import atomic_open
from labelsieve.core.progress import console, escape

if TYPE_CHECKING:  # pragma: no cover
    from labelsieve.core.engine import Trainer

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = 1


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(trainer: Trainer, path: Path, *, epoch: int, key: str | None = None) -> None:
    """Write everything needed to resume ``trainer`` after ``epoch`` finished epochs (atomic replace)."""
    obj = {
        "format": CHECKPOINT_FORMAT,
        "key": key,
        "epoch": int(epoch),
        "global_step": trainer.global_step,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict() if trainer.optimizer is not None else None,
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "scaler": trainer.scaler.state_dict(),
        "loss_fn": trainer.loss_fn.state_dict() if isinstance(trainer.loss_fn, nn.Module) else None,
        "history": copy.deepcopy(trainer.history),
        "best": {"epoch": trainer.best_epoch, "val_acc": trainer.best_val_acc, "state": trainer.best_state},
        "state": trainer.state,
        "rng": _rng_state(),
    }
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(trainer: Trainer, path: Path, key: str | None) -> int:
    """Restore ``trainer`` from ``path``; the number of finished epochs, or 0 (starting over, with a
    warning when progress is on) when the file is unreadable or from a run with another ``key``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        if trainer.progress:
            console.print(f"[yellow]{escape(f'{trainer.desc}: cannot read checkpoint {path} ({exc})')}; starting "
                          "over[/yellow]")
        return 0
    if obj.get("format") != CHECKPOINT_FORMAT or obj.get("key") != key:
        if trainer.progress:
            console.print(f"[yellow]{escape(f'{trainer.desc}: checkpoint {path}')} is from a different run; "
                          "starting over[/yellow]")
        return 0
    trainer.model.load_state_dict(obj["model"])
    if trainer.optimizer is not None and obj["optimizer"] is not None:
        trainer.optimizer.load_state_dict(obj["optimizer"])
    if trainer.scheduler is not None and obj["scheduler"] is not None:
        trainer.scheduler.load_state_dict(obj["scheduler"])
    trainer.scaler.load_state_dict(obj["scaler"])
    if isinstance(trainer.loss_fn, nn.Module) and obj.get("loss_fn") is not None:
        trainer.loss_fn.load_state_dict(obj["loss_fn"])
    trainer.history = list(obj["history"])
    best = obj["best"]
    trainer.best_epoch, trainer.best_val_acc, trainer.best_state = best["epoch"], best["val_acc"], best["state"]
    trainer.state = obj["state"]
    trainer.global_step = int(obj["global_step"])
    _set_rng_state(obj["rng"])
    if trainer.progress:
        console.print(escape(f"{trainer.desc}: resumed from {path} after epoch {obj['epoch']}"))
    return int(obj["epoch"])
