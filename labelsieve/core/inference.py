"""Inference over a loader in dataset order: what :meth:`Trainer.predict` and :meth:`Trainer.evaluate` run.

A loader may visit its dataset in any order (workers, samplers); these functions put every row back at
its dataset position, and rows of images that could not be decoded (``ok = False``) get zero logits and
no loss, never a NaN in a result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labelsieve.core.progress import progress_bar

__all__ = ["infer", "in_dataset_order", "loss_and_accuracy"]

#: Rows per block of :func:`loss_and_accuracy`.
_BLOCK = 1 << 16


@torch.no_grad()
def infer(model: nn.Module, loader: Iterable[Any], *, device: torch.device,
      autocast: Callable[[], contextlib.AbstractContextManager[Any]], progress: bool = False,
      desc: str = "predict") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Logits, labels, yielded indices and ok of every item, in loader order.

    The logits go straight into one (n, C) float32 array when the loader says how many items it yields (a
    DataLoader's sampler does): one copy of the outputs, not a list of batches joined and converted (three
    copies: 12 GB at 10M rows x 100 classes instead of 4)."""
    model.eval()
    chunks: list[torch.Tensor | None] = []  # batches (None: nothing readable) when there is no buffer
    chunk_rows: list[int] = []
    labels, idxs, oks = [], [], []
    n_batches = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    sampler = getattr(loader, "sampler", None)
    total = len(sampler) if sampler is not None and hasattr(sampler, "__len__") else None
    buf: np.ndarray | None = None  # the (total, C) logits, rows in loader order
    filled = 0
    with progress_bar(n_batches, desc, enabled=progress, unit="batch") as advance:
        for batch in loader:
            x, y, idx, ok = batch[0], batch[1], batch[2], batch[3]
            ok = torch.as_tensor(ok, dtype=torch.bool)
            logits = None
            if bool(ok.any()):
                xd = (x if bool(ok.all()) else x[ok]).to(device, non_blocking=True)
                with autocast():
                    out = model(xd)
                logits_ok = out.float().cpu()
                logits = torch.zeros(len(ok), logits_ok.shape[1])
                logits[ok] = logits_ok
            rows = len(ok)
            if buf is None and not chunks and logits is not None and total is not None:
                buf = np.empty((total, logits.shape[1]), dtype=np.float32)
            if buf is not None and filled + rows <= len(buf):
                buf[filled:filled + rows] = logits.numpy() if logits is not None else 0.0
            else:
                if buf is not None:  # more items than the sampler said: join batches from here on
                    chunks.append(torch.from_numpy(buf[:filled]))
                    chunk_rows.append(filled)
                    buf = None
                chunks.append(logits)
                chunk_rows.append(rows)
            filled += rows
            labels.append(torch.as_tensor(y).cpu())
            idxs.append(torch.as_tensor(idx).cpu())
            oks.append(ok.cpu())
            advance(1)
    if not oks:
        return (np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64),
                np.zeros(0, bool))
    if buf is not None:
        out = buf[:filled]
    else:
        width = next((c.shape[1] for c in chunks if c is not None), 0)
        mats = [c if c is not None else torch.zeros(r, width) for c, r in zip(chunks, chunk_rows, strict=True)]
        out = np.asarray(torch.cat(mats).numpy(), dtype=np.float32)
    return (out, torch.cat(labels).numpy().astype(np.int64),
            torch.cat(idxs).numpy().astype(np.int64), torch.cat(oks).numpy().astype(bool))


def _positions(dataset: Any, idx: np.ndarray) -> np.ndarray:
    """Dataset positions of the yielded sample indices ``idx`` (see :meth:`Trainer.predict`)."""
    n = len(dataset)
    index = getattr(dataset, "index", None)
    if index is not None:
        index = np.asarray(index, dtype=np.int64)
        order = np.argsort(index, kind="stable")
        pos = np.searchsorted(index[order], idx)
        pos = np.clip(pos, 0, max(0, n - 1))
        if n == 0 or np.any(index[order][pos] != idx):
            raise ValueError("the loader yielded sample indices that are not in its dataset's .index")
        return order[pos]
    if np.any(idx < 0) or np.any(idx >= n):
        raise ValueError("the dataset has no .index array and yields sample indices outside [0, len(dataset)); "
                         "give it an .index attribute mapping positions to the indices it yields")
    return idx


# --------------------------------------------------------------------------- the trainer


def in_dataset_order(loader: Any, idx: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``arrays`` (rows in the order ``loader`` yielded them, with yielded sample indices ``idx``) reordered
    to ``loader.dataset``'s order.

    Raises
    ------
    ValueError
        If the loader did not visit every item of its dataset exactly once.
    """
    dataset = loader.dataset
    n = len(dataset)
    pos = _positions(dataset, idx)
    if len(pos) != n or len(np.unique(pos)) != n:
        raise ValueError(f"the loader visited {len(pos)} items ({len(np.unique(pos))} distinct) but its dataset "
                         f"has {n}; predict/evaluate need a loader over every item once (no drop_last, "
                         "no sampling with replacement)")
    if np.array_equal(pos, np.arange(n)):  # already in dataset order (an evaluation loader): no copy
        return tuple(arrays)
    out = []
    for a in arrays:
        b = np.empty_like(a)
        b[pos] = a
        out.append(b)
    return tuple(out)


def loss_and_accuracy(logits: np.ndarray, labels: np.ndarray, ok: np.ndarray,
                      targets: Sequence[int] | np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy, mean and per-sample cross-entropy of ``logits`` against ``targets`` (default ``labels``),
    over the readable rows; see :meth:`labelsieve.core.engine.Trainer.evaluate` for the keys."""
    y = labels if targets is None else np.asarray(targets, dtype=np.int64)
    if y.shape != (len(logits),):
        raise ValueError(f"targets must have shape ({len(logits)},); got {y.shape}")
    losses = np.full(len(logits), np.nan, dtype=np.float32)
    if ok.any():
        pred = np.empty(len(logits), dtype=np.int64)
        for i in range(0, len(logits), _BLOCK):  # a block at a time: no (n, C) copy (4 GB at 10M x 100)
            lg, yb, kb = logits[i:i + _BLOCK], y[i:i + _BLOCK], ok[i:i + _BLOCK]
            if kb.all():
                losses[i:i + len(lg)] = F.cross_entropy(torch.from_numpy(lg), torch.from_numpy(yb),
                                                        reduction="none").numpy()
            elif kb.any():
                losses[i:i + len(lg)][kb] = F.cross_entropy(torch.from_numpy(lg[kb]), torch.from_numpy(yb[kb]),
                                                            reduction="none").numpy()
            pred[i:i + len(lg)] = lg.argmax(1)
        acc = float((pred[ok] == y[ok]).mean())
        loss = float(losses[ok].mean())
    else:
        acc, loss = 0.0, 0.0
    return {"acc": acc, "loss": loss, "n": int(ok.sum()), "losses": losses, "logits": logits, "ok": ok, "targets": y}
