"""The one training engine: every method that trains a network (DEFT, TURN, co-divide, ``labelsieve
train``) runs its epochs through :class:`Trainer`.

What it does for every caller:

* **precision** — parameters stay float32 (master weights). On CUDA, forward passes run under
  ``torch.autocast`` in bfloat16 where the GPU supports it, else float16 with a ``GradScaler``;
  on CPU (and MPS) everything is float32.
* **bad images** — batches carry an ``ok`` mask (see :class:`labelsieve.data.ImageDataset` and
  :class:`labelsieve.data.imagecache.CachedImageDataset`); rows with ``ok = False`` are dropped before
  the forward pass, so they touch neither the loss, the BatchNorm statistics nor the accuracy.
* **order** — :meth:`Trainer.predict` / :meth:`Trainer.evaluate` return one row per dataset item,
  in dataset order, whatever the sampler did.
* **CPU speed** — on CPU, denormal floats are flushed to zero (``torch.set_flush_denormal``, a
  process-wide setting): pretrained weights and Adam's moment estimates contain denormals that made
  fine-tuning EfficientNet-Lite0 four times slower.
* **resume** — :meth:`Trainer.fit` writes a checkpoint after every epoch (model, optimizer,
  scheduler, scaler, history, best weights, :attr:`Trainer.state`, RNG states; atomic replace) and
  continues from it, giving the same weights as an uninterrupted run.
* **several processes** (torchrun, :mod:`labelsieve.core.distributed`) — :func:`make_loader` gives each
  rank its share of a dataset of images (a ``DistributedSampler``, shuffled from the per-epoch seed; each
  rank loads ``batch_size // world size`` images per step, so ``batch_size`` stays the batch of one
  optimizer step and the methods' schedules keep their meaning). A Trainer fed such a loader trains under
  ``torch.nn.parallel.DistributedDataParallel``: DDP wraps the *step* (the default step, or the method's
  ``step_fn``), so it sees every parameter the step uses, whether it calls the model's ``forward`` or
  another of its methods (DEFT's ``cosines``, co-divide's ``views``); gradients are averaged over the
  ranks during backward, BatchNorm statistics follow rank 0. A batch is skipped on every rank when it
  cannot be used on one (no readable image, non-finite loss). :meth:`Trainer.predict` and
  :meth:`Trainer.evaluate` gather every rank's rows, so each rank gets the whole dataset, in dataset
  order. Only rank 0 writes checkpoints and prints. Datasets held in memory (a ``TensorDataset`` of
  cached features) are not split, and nothing is split inside
  :func:`labelsieve.core.distributed.run_on_main` (detectors run there, on rank 0 alone).

A method plugs in by passing its own model (any ``nn.Module`` mapping a batch of images to logits),
optimizer and per-sample loss ``loss_fn(logits, targets, index)``; or, for steps that are not
"forward one batch, one loss" (FixMatch, two networks, dual prompts), a ``step_fn(trainer, batch)``
that returns ``(loss, n_correct, n)`` and leaves backward/step/scaler/clipping to the Trainer.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labelsieve.core import distributed
from labelsieve.core.checkpoint import load_checkpoint, save_checkpoint
from labelsieve.core.errors import ParameterError, check_param
from labelsieve.core.inference import in_dataset_order, infer, loss_and_accuracy
from labelsieve.core.progress import console, escape, progress_bar
from labelsieve.core.runtime import autocast_dtype, check_amp, resolve_device

__all__ = ["Trainer", "freeze_batchnorm", "make_loader"]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
StepFn = Callable[["Trainer", Sequence[Any]], tuple[torch.Tensor, int, int]]


# --------------------------------------------------------------------------- helpers


def per_sample_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                             index: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy per sample (float32), the default ``loss_fn``; ``index`` is ignored."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


class _Step(nn.Module):
    """What ``DistributedDataParallel`` wraps: one training step as a forward pass.

    Its only submodule is the trainer's model, so DDP averages the gradients of every trainable
    parameter of the model that the step used, however the step reached it.
    """

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.model = trainer.model
        self.trainer = [trainer]  # a list: not a submodule, not a parameter
        self.step_fn: StepFn | None = None

    def forward(self, batch: Sequence[Any]) -> tuple[torch.Tensor | None, int, int]:
        trainer = self.trainer[0]
        return trainer._default_step(batch) if self.step_fn is None else self.step_fn(trainer, batch)


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer of ``model`` in evaluation mode (call after ``model.train()``).

    Returns the number of layers frozen. Their running statistics stay as they are; their affine
    parameters keep ``requires_grad`` and still train.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


class Trainer:
    """Train, evaluate and predict with one model; the engine every training method shares.

    Parameters
    ----------
    model : nn.Module
        Maps a float image batch (B, 3, H, W) to logits (B, C) (only the default step and
        :meth:`predict` rely on that; a custom ``step_fn`` may use any model). Moved to ``device``;
        floating-point parameters are converted to float32 (master weights).
    optimizer : torch.optim.Optimizer, optional
        Over the model's trainable parameters (see :func:`make_optimizer`). ``None`` for a Trainer
        used only to :meth:`predict` / :meth:`evaluate`.
    scheduler : LRScheduler, optional
        Stepped after every optimizer step (``scheduler_interval="step"``, as
        :func:`cosine_schedule` expects) or after every epoch (``"epoch"``).
    loss_fn : callable, optional
        ``loss_fn(logits, targets, index) -> loss`` on the readable rows of a batch; per-sample
        losses (B,) are averaged, a scalar is used as is. Default: per-sample cross-entropy. The
        losses of :mod:`labelsieve.detectors.common.losses` (``get_loss(name, reduction="none")``) have
        this signature; an ``nn.Module`` loss (ELR) is moved to ``device``, put in train mode for
        training epochs, and its state (ELR's running targets) is checkpointed.
    device : str or torch.device, optional
        See :func:`resolve_device`.
    amp : {"auto", "bf16", "fp16", "off"}
        Mixed precision on CUDA. ``"auto"``: bfloat16 if the GPU supports it, else float16 (with a
        GradScaler). Ignored (float32) on other devices.
    grad_clip : float, optional
        Clip the global gradient norm to this value (after unscaling).
    progress : bool
        Show a progress bar per epoch and log one line per epoch (on rank 0 only, under torchrun).
    desc : str
        Name shown on progress bars and log lines.
    scheduler_interval : {"step", "epoch"}
        When to call ``scheduler.step()``.
    freeze_bn : bool, default=False
        Keep every BatchNorm layer in evaluation mode during training epochs (see
        :func:`freeze_batchnorm`): the pretrained running statistics are used and not updated, which
        keeps a pretrained CNN stable when batches are small or class-skewed. Its affine weights still
        train.

    Attributes
    ----------
    amp_dtype : torch.dtype or None
        The autocast dtype in use (None: float32).
    scaler : torch.amp.GradScaler
        Enabled only for float16.
    history : list of dict
        One record per finished epoch of :meth:`fit`.
    best_epoch, best_val_acc : int or None, float or None
        Epoch (0-based) and validation accuracy of the best epoch so far.
    best_state : dict or None
        CPU copy of the model's ``state_dict`` at the best epoch.
    state : dict
        Free-form state of the calling method (e.g. a clean-sample mask) saved in and restored from
        checkpoints; keep it to tensors, arrays and plain Python values.
    global_step : int
        Optimizer steps taken.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        loss_fn: LossFn | None = None,
        device: str | torch.device | None = None,
        amp: str = "auto",
        grad_clip: float | None = None,
        progress: bool = True,
        desc: str = "train",
        scheduler_interval: str = "step",
        freeze_bn: bool = False,
    ) -> None:
        owner = "Trainer"
        check_param(owner, "model", model, isinstance(model, nn.Module), "a torch.nn.Module")
        check_param(owner, "optimizer", optimizer, optimizer is None or isinstance(optimizer, torch.optim.Optimizer),
                    "a torch.optim.Optimizer or None")
        check_amp(owner, amp)
        check_param(owner, "grad_clip", grad_clip,
                    grad_clip is None or (isinstance(grad_clip, (int, float)) and grad_clip > 0), "None or a float > 0")
        check_param(owner, "scheduler_interval", scheduler_interval, scheduler_interval in ("step", "epoch"),
                    "'step' or 'epoch'")
        check_param(owner, "loss_fn", loss_fn, loss_fn is None or callable(loss_fn), "None or a callable")
        check_param(owner, "freeze_bn", freeze_bn, isinstance(freeze_bn, bool), "True or False")
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            # Pretrained weights and Adam's second moments hold denormal floats, which make CPU
            # arithmetic several times slower (4x for EfficientNet-Lite0 fine-tuning); flush them to zero.
            torch.set_flush_denormal(True)
        self.model = model
        self._to_fp32_master(model)
        self.model.to(self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else per_sample_cross_entropy
        if isinstance(self.loss_fn, nn.Module):  # stateful losses (ELR) keep their buffers beside the model
            self.loss_fn.to(self.device)
        self.grad_clip = grad_clip
        self.progress = progress and distributed.is_main()
        self.desc = desc
        self.scheduler_interval = scheduler_interval
        self.freeze_bn = freeze_bn
        self.amp_dtype = autocast_dtype(self.device, amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.history: list[dict[str, Any]] = []
        self.best_epoch: int | None = None
        self.best_val_acc: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.state: dict[str, Any] = {}
        self.global_step = 0
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        self._ddp_params: tuple[int, ...] = ()

    # -- setup -------------------------------------------------------------------------------------
    @staticmethod
    def _to_fp32_master(model: nn.Module) -> None:
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        for b in model.buffers():
            if b.is_floating_point() and b.dtype in (torch.float16, torch.bfloat16):
                b.data = b.data.float()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of this trainer (a no-op in float32); use it in custom code."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, batch: Any) -> Any:
        """``batch`` (tensor, or nested tuple/list/dict of tensors) moved to :attr:`device`."""
        return _to_device(batch, self.device)

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group (nan without an optimizer)."""
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else float("nan")

    # -- one optimisation step ---------------------------------------------------------------------
    def _default_step(self, batch: Sequence[Any]) -> tuple[torch.Tensor | None, int, int]:
        x, y, idx, ok = batch[0], batch[1], batch[2], batch[3]
        ok = ok.to(torch.bool)
        if not bool(ok.all()):
            x, y, idx = x[ok], y[ok], idx[ok]
        if x.shape[0] == 0:
            return None, 0, 0
        logits = self.model(x)
        loss = self.loss_fn(logits, y, idx)
        if loss.dim() > 0:
            loss = loss.float().mean()
        with torch.no_grad():
            correct = int((logits.argmax(1) == y).sum())
        return loss, correct, int(x.shape[0])

    def _distributed_step(self, step_fn: StepFn | None) -> nn.parallel.DistributedDataParallel | None:
        """The DDP-wrapped step for a sharded loader (built once, again if the trainable set changes);
        None when the model has nothing to train."""
        trainable = tuple(i for i, p in enumerate(self.model.parameters()) if p.requires_grad)
        if not trainable:
            return None
        if self._ddp is None or trainable != self._ddp_params:
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            # static_graph: a step may leave some trainable parameters unused (the same ones every step;
            # DDP stops with an error if that set changes), without a search of the graph at every step
            self._ddp = nn.parallel.DistributedDataParallel(_Step(self), device_ids=ids, static_graph=True)
            self._ddp_params = trainable
        self._ddp.module.step_fn = step_fn
        return self._ddp

    def _optimize(self, loss: torch.Tensor, finite: bool) -> bool:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            return False
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.global_step += 1
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        return True

    # -- epochs ------------------------------------------------------------------------------------
    def train_epoch(self, loader: Iterable[Any], *, epoch: int = 0, step_fn: StepFn | None = None,
                    epochs: int | None = None) -> dict[str, Any]:
        """Train for one pass over ``loader``.

        Parameters
        ----------
        loader : iterable of batches
            Default step: batches ``(x, label, index, ok)``. With ``step_fn``: anything it accepts.
        epoch : int
            0-based epoch number (for the record and the display).
        step_fn : callable, optional
            ``step_fn(trainer, batch) -> (loss, n_correct, n)`` computing the loss of one batch
            (already on :attr:`device`, run inside :meth:`autocast`); the Trainer does
            ``zero_grad``, backward (scaled), clipping, the optimizer and scheduler steps. Return
            ``loss=None`` or ``n=0`` to skip the batch.
        epochs : int, optional
            Total epochs, for the display only.

        Returns
        -------
        dict
            ``epoch``, ``loss`` (mean over the samples used), ``acc`` (training accuracy),
            ``n`` (samples used), ``seconds``, ``images_per_s``, ``lr`` (at the end of the epoch),
            ``skipped`` (steps skipped for a non-finite loss).
        """
        if self.optimizer is None:
            raise ParameterError("Trainer.train_epoch needs an optimizer; this Trainer was made without one.")
        self.model.train()
        if self.freeze_bn:
            freeze_batchnorm(self.model)
        if isinstance(self.loss_fn, nn.Module):
            self.loss_fn.train()
        total_loss, correct, seen, skipped = 0.0, 0, 0, 0
        t0 = time.perf_counter()
        n_batches = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        label = f"{self.desc} {epoch + 1}" + (f"/{epochs}" if epochs else "")
        sharded = distributed.is_sharded(loader)
        ddp = self._distributed_step(step_fn) if sharded else None
        with progress_bar(n_batches, label, enabled=self.progress, unit="batch") as advance:
            for batch in loader:
                batch = self.to_device(batch)
                with self.autocast():
                    if ddp is not None:
                        loss, n_correct, n = ddp(batch)
                    elif step_fn is None:
                        loss, n_correct, n = self._default_step(batch)
                    else:
                        loss, n_correct, n = step_fn(self, batch)
                usable = loss is not None and n > 0
                finite = usable and bool(torch.isfinite(loss.detach()))
                if sharded:  # every rank steps, or none (DDP's backward waits for all ranks)
                    usable, finite = distributed.all_true(usable, finite)
                if not usable:
                    advance(1)
                    continue
                if not self._optimize(loss, finite):
                    skipped += 1
                    advance(1)
                    continue
                total_loss += float(loss.detach()) * n
                correct += int(n_correct)
                seen += int(n)
                advance(1, loss=f"{total_loss / max(seen, 1):.4f}")
        if sharded:
            total_loss, correct, seen = distributed.sum_over_ranks([total_loss, correct, seen])
            correct, seen = int(correct), int(seen)
            distributed.broadcast_buffers(self.model)  # one model on every rank for what follows
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        seconds = time.perf_counter() - t0
        if skipped and self.progress:
            console.print(f"[yellow]{escape(self.desc)}: skipped {skipped} step(s) with a non-finite loss in epoch "
                          f"{epoch + 1}[/yellow]")
        return {"epoch": int(epoch), "loss": total_loss / seen if seen else 0.0, "acc": correct / seen if seen else 0.0,
                "n": seen, "seconds": seconds, "images_per_s": seen / seconds if seconds > 0 else 0.0,
                "lr": self.lr, "skipped": skipped}

    def _infer(self, loader: Iterable[Any], what: str) -> tuple[np.ndarray, ...]:
        out = infer(self.model, loader, device=self.device, autocast=self.autocast, progress=self.progress,
                    desc=f"{self.desc}: {what}")
        if distributed.is_sharded(loader):  # every rank's share; the sampler's padding repeats a few items
            out = distributed.gather_rows(*out)
            first = np.sort(np.unique(out[2], return_index=True)[1])
            out = tuple(a[first] for a in out)
        return out

    def predict(self, loader: torch.utils.data.DataLoader) -> tuple[np.ndarray, np.ndarray]:
        """Logits of every item of ``loader.dataset``, in dataset order.

        Parameters
        ----------
        loader : DataLoader
            Batches ``(x, label, index, ok)``. Row ``k`` of the output belongs to item ``k`` of
            ``loader.dataset``: the item whose yielded ``index`` is ``dataset.index[k]`` when the
            dataset has an ``index`` array (as :class:`~labelsieve.data.datasets.ImageDataset` and
            :class:`~labelsieve.data.imagecache.CachedImageDataset` do), else the item yielding ``k``.
            Any sampler order works; every item must be visited once (under torchrun, once over all
            ranks: a loader from :func:`make_loader` gives each rank a share, and the rows are gathered).

        Returns
        -------
        logits : ndarray of shape (n, C), float32
            Zeros for unreadable items.
        ok : ndarray of shape (n,), bool
            False for items whose image could not be decoded.
        """
        logits, _, idx, ok = self._infer(loader, "predict")
        return in_dataset_order(loader, idx, logits, ok)

    def evaluate(self, loader: torch.utils.data.DataLoader,
                 targets: Sequence[int] | np.ndarray | None = None) -> dict[str, Any]:
        """Accuracy, mean cross-entropy and per-sample cross-entropy over ``loader.dataset``.

        ``targets`` (in dataset order) defaults to the labels the loader yields. Returns ``acc`` and
        ``loss`` over the readable items (0.0 when there are none), ``n`` (readable items), ``losses``
        (ndarray (n,) float32, **NaN for unreadable items**), ``logits`` (ndarray (n, C) float32), ``ok``
        (ndarray (n,) bool) and ``targets`` (ndarray (n,) int64), all in dataset order.
        """
        logits, labels, idx, ok = self._infer(loader, "evaluate")
        return loss_and_accuracy(*in_dataset_order(loader, idx, logits, labels, ok), targets)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(
        self,
        train_loader: Iterable[Any] | Callable[[int], Iterable[Any]],
        *,
        epochs: int,
        val_loader: torch.utils.data.DataLoader | None = None,
        step_fn: StepFn | None = None,
        on_epoch_start: Callable[[Trainer, int], None] | None = None,
        on_epoch_end: Callable[[Trainer, int, dict[str, Any]], None] | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        checkpoint_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """Train for ``epochs`` epochs, with validation, best/last tracking and resumable checkpoints.

        Parameters
        ----------
        train_loader : iterable, or callable ``epoch -> iterable``
            The training batches; a callable is asked for the loader of each (0-based) epoch — use
            it when the sample set changes per epoch (DEFT, TURN, co-divide) or when the loader's
            shuffling should be seeded from ``(seed, epoch)``.
        epochs : int
            Total number of epochs (>= 1); when resuming, only the missing ones run.
        val_loader : DataLoader, optional
            Evaluated after every epoch (:meth:`evaluate`); its accuracy selects the best epoch.
        step_fn : callable, optional
            Custom step, see :meth:`train_epoch`.
        on_epoch_start : callable, optional
            ``on_epoch_start(trainer, epoch)`` before each epoch (e.g. select clean samples).
        on_epoch_end : callable, optional
            ``on_epoch_end(trainer, epoch, record)`` after each epoch and its validation, before the
            checkpoint is written; it may add JSON-able entries to ``record``.
        checkpoint_path : path, optional
            Written (atomically, by rank 0) after every epoch; if it exists when ``fit`` starts,
            training resumes from it.
        checkpoint_key : str, optional
            Identifies the run configuration; an existing checkpoint with a different key is
            ignored (and overwritten) instead of resumed.

        Returns
        -------
        list of dict
            :attr:`history`: per epoch the :meth:`train_epoch` record plus ``val_acc`` and
            ``val_loss`` (when validating) and ``best`` (True on the best epoch so far).
        """
        check_param("Trainer.fit", "epochs", epochs, isinstance(epochs, int) and epochs >= 1, "an int >= 1")
        ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
        start = 0
        if ckpt is not None and ckpt.exists():
            start = load_checkpoint(self, ckpt, checkpoint_key)
        for epoch in range(start, epochs):
            if on_epoch_start is not None:
                on_epoch_start(self, epoch)
            loader = train_loader(epoch) if callable(train_loader) and not hasattr(train_loader, "__iter__") \
                else train_loader
            record = self.train_epoch(loader, epoch=epoch, step_fn=step_fn, epochs=epochs)  # type: ignore[arg-type]
            if val_loader is not None:
                ev = self.evaluate(val_loader)
                record["val_acc"], record["val_loss"] = ev["acc"], ev["loss"]
                better = self.best_val_acc is None or ev["acc"] > self.best_val_acc
                if better:
                    self.best_epoch, self.best_val_acc = epoch, ev["acc"]
                    self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                record["best"] = bool(better)
            if on_epoch_end is not None:
                on_epoch_end(self, epoch, record)
            self.history.append(record)
            self._log(record, epochs)
            if ckpt is not None and distributed.is_main():
                self.save_checkpoint(ckpt, epoch=epoch + 1, key=checkpoint_key)
        return self.history

    def _log(self, r: dict[str, Any], epochs: int) -> None:
        if not self.progress:
            return
        msg = (f"[bold]{escape(self.desc)}[/bold] epoch {r['epoch'] + 1}/{epochs}: loss {r['loss']:.4f}, "
               f"train acc {r['acc']:.3f}, {r['images_per_s']:.1f} img/s, lr {r['lr']:.2e}")
        if "val_acc" in r:
            msg += f", val acc {r['val_acc']:.3f}" + (" (best)" if r.get("best") else "")
        console.print(msg)

    def restore_best(self) -> bool:
        """Load the best epoch's weights into the model; False (nothing changed) if there are none."""
        if self.best_state is None:
            return False
        self.model.load_state_dict(self.best_state)
        return True

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike[str], *, epoch: int, key: str | None = None) -> None:
        """Write everything needed to resume after ``epoch`` finished epochs (atomic replace); see
        :mod:`labelsieve.core.checkpoint`."""
        save_checkpoint(self, Path(path), epoch=epoch, key=key)


def make_loader(dataset: Any, *, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
                sampler: torch.utils.data.Sampler | None = None,
                drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader whose shuffling (and worker seeds) come from ``seed`` only, not the global RNG.

    Build one per epoch with ``seed = hash of (run seed, epoch)`` inside the callable form of
    :meth:`Trainer.fit` and a resumed run draws exactly the batches of an uninterrupted one.

    Under torchrun (several ranks) a dataset that is not a ``TensorDataset`` is split between the ranks
    (see the module docstring): each rank gets a ``DistributedSampler`` share (or its share of
    ``sampler``'s draws, made on rank 0) and loads ``batch_size // world size`` (at least 1) images per
    step; a shuffled (training) loader drops a last batch of a single image, which BatchNorm cannot
    train on. Inside :func:`labelsieve.core.distributed.run_on_main` (rank 0 alone) nothing is split.

    Parameters
    ----------
    dataset : Dataset
    batch_size : int
    shuffle : bool
        Random order (ignored when ``sampler`` is given).
    seed : int
        Seeds the loader's generator (shuffle order, sampler draws if the sampler uses the
        loader's generator, worker base seeds).
    num_workers : int
        Worker processes.
    sampler : Sampler, optional
        E.g. a :class:`torch.utils.data.WeightedRandomSampler` for class-balanced batches.
    drop_last : bool

    Returns
    -------
    torch.utils.data.DataLoader
    """
    check_param("make_loader", "batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1,
                "an int >= 1")
    check_param("make_loader", "num_workers", num_workers, isinstance(num_workers, int) and num_workers >= 0,
                "an int >= 0")
    g = torch.Generator()
    g.manual_seed(int(seed))
    if distributed.sharding() and not isinstance(dataset, torch.utils.data.TensorDataset):
        training = shuffle or sampler is not None
        sampler = distributed.shard_sampler(dataset, shuffle=shuffle, seed=seed, sampler=sampler)
        batch_size = max(1, batch_size // distributed.world_size())
        drop_last = drop_last or (training and len(sampler) > batch_size and len(sampler) % batch_size == 1)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                                       generator=g, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False)
