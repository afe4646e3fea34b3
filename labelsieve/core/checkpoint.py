"""Checkpoints of a :class:`~labelsieve.core.engine.Trainer`: everything needed to resume after an epoch
(model, optimizer, scheduler, scaler, history, best weights, the method's state, RNG states), written
atomically, so an interrupted run continues with the same weights as an uninterrupted one.

The file is a **safetensors** file: the tensors (weights, optimizer buffers, RNG states, arrays) are its
tensors, and everything else (epoch, history, hyper-parameters, RNG counters) is JSON in its metadata.
Reading it runs no code: safetensors parses a JSON header and raw buffers, and :func:`_decode` rebuilds
only dicts, lists, tuples, strings, numbers, booleans, ``None``, tensors and numpy arrays. A checkpoint
in any other form (a pickle, such as the ``checkpoint.pt`` earlier versions wrote with ``torch.save``)
is never unpickled: it is ignored with a warning and training starts over.
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors
from torch import nn

from labelsieve.core.errors import DataError
from labelsieve.core.io import atomic_open
from labelsieve.core.progress import console, escape

if TYPE_CHECKING:  # pragma: no cover
    from labelsieve.core.engine import Trainer

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "LEGACY_CHECKPOINT_NAMES", "decode_state", "encode_state",
           "load_checkpoint", "read_state", "save_checkpoint", "write_state"]

CHECKPOINT_FORMAT = 2
#: The checkpoint's file name in a training folder (``train -o DIR``).
CHECKPOINT_NAME = "checkpoint.safetensors"
#: Checkpoint names of earlier versions (pickles): never read; a training run says it ignores them.
LEGACY_CHECKPOINT_NAMES = ("checkpoint.pt",)
_META_KEY = "labelsieve_state"


# --------------------------------------------------------------------------- encoding
def encode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-able data, its tensors and arrays moved into ``tensors`` (name -> tensor).

    Handles dicts (any hashable keys of the types below), lists, tuples, str, int, float (NaN and ±inf
    included), bool, None, numpy scalars, ``torch.Tensor`` and numpy arrays of a non-object dtype.

    Raises
    ------
    TypeError
        For anything else (it could not be restored without running code).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else {"__float__": repr(f)}
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        t = obj.detach().to("cpu")
        if not t.is_contiguous() or any(_same_storage(t, u) for u in tensors.values()):
            t = t.contiguous().clone()
        tensors[name] = t
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("a checkpoint cannot hold an object array (it could only be read back by unpickling)")
        name = f"t{len(tensors)}"
        flat = np.ascontiguousarray(obj)
        tensors[name] = torch.from_numpy(flat.view(np.uint8).reshape(-1).copy())
        return {"__ndarray__": name, "dtype": flat.dtype.str, "shape": list(flat.shape)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors) for k, v in obj.items()}
        return {"__dict__": [[encode_state(k, tensors), encode_state(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"a checkpoint cannot hold a {type(obj).__name__} (only tensors, arrays and plain values)")


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_state`: builds only plain values, tensors and numpy arrays.

    Raises
    ------
    ValueError
        For a structure :func:`encode_state` does not write (a damaged or foreign file).
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        raise ValueError(f"unexpected {type(obj).__name__} in a checkpoint")
    if "__tensor__" in obj:
        return tensors[str(obj["__tensor__"])]
    if "__ndarray__" in obj:
        dtype = np.dtype(str(obj["dtype"]))
        if dtype.hasobject:
            raise ValueError("object arrays are not read from checkpoints")
        raw = tensors[str(obj["__ndarray__"])].numpy().tobytes()
        return np.frombuffer(raw, dtype=dtype).reshape([int(s) for s in obj["shape"]]).copy()
    if "__float__" in obj:
        return float(str(obj["__float__"]))
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        out = {}
        for k, v in obj["__dict__"]:
            key = decode_state(k, tensors)
            out[tuple(key) if isinstance(key, list) else key] = decode_state(v, tensors)
        return out
    return {k: decode_state(v, tensors) for k, v in obj.items()}


def write_state(obj: Any, path: str | Path) -> None:
    """Write ``obj`` (see :func:`encode_state`) as one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(encode_state(obj, tensors), allow_nan=False, separators=(",", ":"))
    data = save_tensors(tensors, metadata={_META_KEY: meta})
    with atomic_open(path, "wb") as f:
        f.write(data)


def read_state(path: str | Path) -> Any:
    """Read what :func:`write_state` wrote, without running code.

    Raises
    ------
    ValueError
        The file is not such a file (a pickle, a damaged file, another safetensors file).
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own SafetensorError on anything that is not its format
        raise ValueError(f"not a labelsieve checkpoint ({type(exc).__name__}: {exc})") from exc
    if _META_KEY not in meta:
        raise ValueError("not a labelsieve checkpoint (no state in its metadata)")
    return decode_state(json.loads(meta[_META_KEY]), tensors)


# --------------------------------------------------------------------------- the trainer's state
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))  # type: ignore[arg-type]
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
    write_state(obj, path)


def _say(trainer: Trainer, text: str) -> None:
    if trainer.progress:
        console.print(f"[yellow]{escape(f'{trainer.desc}: {text}')}[/yellow]")


def load_checkpoint(trainer: Trainer, path: Path, key: str | None) -> int:
    """Restore ``trainer`` from ``path``; the number of finished epochs, or 0 (starting over, with a
    warning when progress is on) when the file is unreadable, not a checkpoint of this format (a pickle
    is never unpickled), or from a run with another ``key``."""
    try:
        obj = read_state(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _say(trainer, f"cannot read checkpoint {path} ({exc}); starting over")
        return 0
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT or obj.get("key") != key:
        _say(trainer, f"checkpoint {path} is from a different run; starting over")
        return 0
    try:
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
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{path}: the checkpoint of this run is damaged ({type(exc).__name__}: {exc}). Delete it "
                        "to start the training over.") from exc
    if trainer.progress:
        console.print(escape(f"{trainer.desc}: resumed from {path} after epoch {obj['epoch']}"))
    return int(obj["epoch"])
