"""Fine-tune a classifier on the images an audit kept (``labelsieve train``), and export it.

:func:`train_from_audit` reads a reviewed ``audit.csv``, keeps the rows the review rule keeps
(:func:`labelsieve.audit.review.kept_rows`: non-flagged rows and reviewed decisions; ``drop``, unreadable
and — by default — flagged rows nobody reviewed removed), and calls :func:`train_on_labels`, which
benchmarks also use directly to train on all noisy labels or on the true labels for comparison.

Training follows DEFT's adaptation phase: full fine-tuning of the whole backbone with a new linear
head, the backbone's optimiser settings (:data:`labelsieve.models.classifiers.TRAIN_DEFAULTS`), a
cosine schedule, random resized crop + horizontal flip, cross-entropy. Images are decoded once into
a :class:`~labelsieve.data.imagecache.DecodedImageCache` at ``floor(image_size / crop_pct)`` pixels;
training crops come from it, evaluation is its centre ``image_size`` crop (timm's evaluation
transform). A stratified ``val_fraction`` of the kept rows (or a separate ``val_csv``) is held out;
the export holds the weights of the epoch with the best validation accuracy (the last epoch when
there is no validation set), and ``model.json`` records best and last accuracy.

Export (``out_dir``)::

    model.safetensors   the classifier's weights
    model.json          classes, backbone, weights source, preprocessing, training record
    checkpoint.safetensors  only while training (resume by rerunning the same command); removed at the end.
                        Tensors plus JSON, read without unpickling (:mod:`labelsieve.core.checkpoint`); a
                        ``checkpoint.pt`` (a pickle, as earlier versions wrote) is never read.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from labelsieve import __version__
from labelsieve.audit.auditset import open_audit
from labelsieve.audit.decisions import merge_reviews, read_reviews
from labelsieve.audit.review import kept_rows, record_classes, sheet_vs_record
from labelsieve.core import distributed
from labelsieve.core.checkpoint import CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAMES
from labelsieve.core.defaults import default_num_workers
from labelsieve.core.engine import Trainer, make_loader
from labelsieve.core.errors import DataError, ModelError, check_param
from labelsieve.core.optim import cosine_schedule, make_optimizer
from labelsieve.core.paths import check_image_paths, check_output_dir, listed
from labelsieve.core.progress import console, escape, warn
from labelsieve.core.runtime import resolve_device, seed_everything
from labelsieve.data import LabeledImages, default_classname, load_images
from labelsieve.data.containers import open_samples
from labelsieve.data.imagecache import CachedImageDataset, DecodedImageCache
from labelsieve.data.transforms import eval_transform, train_transform
from labelsieve.models.classifiers import DataConfig, create_classifier, train_defaults
from labelsieve.models.loader import ModelSpec, parse_model
from labelsieve.train.export import MODEL_FORMAT, MODEL_FORMAT_VERSION, export_classifier

__all__ = ["MIN_IMAGES_PER_CLASS", "TrainReport", "resolve_backbone", "stratified_split", "train_from_audit",
           "train_on_labels"]

#: ``train --clean`` refuses a class that keeps fewer images (a class that keeps none is left out of the
#: model, with a message): one image can neither be learnt from nor validated on.
MIN_IMAGES_PER_CLASS = 2


@dataclass
class TrainReport:
    """What a training run achieved.

    Attributes
    ----------
    best_val_acc, last_val_acc : float or None
        Validation accuracy of the best and of the last epoch (None without a validation set).
    epochs : int
        Epochs trained.
    n_train, n_val : int
        Training and validation images.
    seconds : float
        Wall time of the whole run (decoding, training, export).
    out_dir : Path or None
        Where the model was exported (None when not exported).
    history : list of dict
        Per-epoch records of :meth:`labelsieve.core.engine.Trainer.fit`.
    best_epoch : int or None
        0-based epoch of ``best_val_acc``.
    exported : str
        ``"best"`` or ``"last"``: which epoch's weights the model holds.
    test_acc : float or None
        Accuracy on ``test_images`` (with the exported weights), when given.
    images_per_s : float
        Training throughput, mean over epochs.
    config : dict
        The resolved settings (optimizer, lr, batch size, image size, …).
    """

    best_val_acc: float | None
    last_val_acc: float | None
    epochs: int
    n_train: int
    n_val: int
    seconds: float
    out_dir: Path | None
    history: list[dict[str, Any]]
    best_epoch: int | None = None
    exported: str = "last"
    test_acc: float | None = None
    images_per_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)


def stratified_split(labels: np.ndarray, fraction: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into train and validation, class by class.

    Each class with ``n >= 2`` rows puts ``max(1, round(fraction * n))`` of them (at most ``n - 1``)
    into validation; classes with one row stay in training.

    Parameters
    ----------
    labels : ndarray of shape (n,), int
    fraction : float in [0, 1)
    seed : int

    Returns
    -------
    train, val : ndarray of int64
        Sorted row indices.
    """
    check_param("stratified_split", "fraction", fraction, isinstance(fraction, (int, float)) and 0 <= fraction < 1,
                "a float in [0, 1)")
    labels = np.asarray(labels)
    if fraction == 0:
        return np.arange(len(labels), dtype=np.int64), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        rows = np.nonzero(labels == c)[0]
        if len(rows) < 2:
            continue
        k = min(len(rows) - 1, max(1, int(round(fraction * len(rows)))))
        val.append(rng.choice(rows, size=k, replace=False))
    v = np.sort(np.concatenate(val)).astype(np.int64) if val else np.zeros(0, dtype=np.int64)
    t = np.setdiff1d(np.arange(len(labels), dtype=np.int64), v)
    return t, v


def _config_key(cfg: dict[str, Any], paths: list[str], labels: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for p in paths:
        h.update(p.encode() + b"\0")
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def _clip_config(spec: ModelSpec) -> dict[str, Any] | None:
    """The ``open_clip_config.json`` of a local CLIP folder (kept in model.json so predict can rebuild it)."""
    folder = spec.local_dir
    f = folder / "open_clip_config.json" if folder is not None else None
    return json.loads(f.read_text()) if f is not None and f.is_file() else None


def resolve_backbone(backbone: str | ModelSpec, pretrained: str | None = None, *,
                     audit_model: dict[str, Any] | None = None) -> ModelSpec:
    """The backbone to train: a parsed model name, or for ``"clip"`` the CLIP model the audit used.

    Raises
    ------
    ModelError
        For ``"clip"`` without an audit that names its CLIP model, or an unknown name.
    """
    if isinstance(backbone, ModelSpec):
        return backbone
    if str(backbone).strip().lower() == "clip":
        spec = (audit_model or {}).get("spec")
        if not spec or spec.get("family") != "open_clip":
            raise ModelError("Backbone 'clip' means the CLIP model of the audit, and this audit does not name one "
                             "(audit.json missing, or the audit used an image-only model). Name the CLIP model "
                             "instead: --backbone ViT-B-16, or --backbone PATH for a local open_clip folder.")
        return ModelSpec(**spec) if pretrained is None else parse_model(spec["name"], pretrained)
    return parse_model(backbone, pretrained)


def _training_config(spec: ModelSpec, *, optimizer: str | None, lr: float | None, weight_decay: float | None,
                     batch_size: int | None, epochs: int | None, warmup_epochs: float, balanced: bool,
                     freeze_bn: bool, crop_scale: tuple[float, float], seed: int) -> dict[str, Any]:
    """The resolved optimiser settings: the backbone's defaults (:func:`train_defaults`), overridden."""
    defaults = train_defaults(spec)
    return {
        "optimizer": (optimizer or defaults["optimizer"]).lower(),
        "lr": float(lr if lr is not None else defaults["lr"]),
        "weight_decay": float(weight_decay if weight_decay is not None else defaults["weight_decay"]),
        "momentum": float(defaults["momentum"]),
        "batch_size": int(batch_size or defaults["batch_size"]),
        "epochs": int(epochs or defaults["epochs"]),
        "warmup_epochs": warmup_epochs,
        "schedule": "cosine (per step)",
        "defaults_source": defaults["source"],
        "balanced": bool(balanced),
        "freeze_bn": bool(freeze_bn),
        "crop_scale": [float(crop_scale[0]), float(crop_scale[1])],
        "seed": seed,
    }


@dataclass
class _Data:
    """Decoded images and loaders of one training run."""

    files: list[str]
    labels: np.ndarray
    n_train: int
    n_val: int
    loader_for: Any
    eval_loader: Any
    rows_test: np.ndarray


def _prepare_data(parts: list[LabeledImages | None], data: DataConfig, cfg: dict[str, Any], *, seed: int,
                  n_classes: int, workers: int, cache_dir: Any, progress: bool) -> _Data:
    """Decode train, validation and test images once at ``data.resize_size`` and build their loaders."""
    train_set, val_set, test_set = parts
    assert train_set is not None
    present = [p for p in parts if p is not None]
    labels = np.concatenate([p.labels for p in present]).astype(np.int64)
    if len({p.kind for p in present}) == 1:
        every = LabeledImages.concat(present)
        files = every.paths if every.members is not None else [str(every.abspath(i)) for i in range(len(every))]
    else:  # files and container members together (a validation CSV of files for an audit of shards)
        raise DataError("The training and validation images must be stored alike (all files, or all in the same kind "
                        "of container): give a validation CSV of the audit's own samples.")

    def open_cache() -> DecodedImageCache:
        return DecodedImageCache.from_images(every, size=data.resize_size, mode="crop", cache_dir=cache_dir,
                                             num_workers=workers, progress=progress)

    # under torchrun rank 0 decodes while the others wait, then they open what it wrote
    cache = distributed.run_on_main(open_cache)
    if cache is None:
        cache = open_cache()
    n_tr, n_val = len(train_set), len(val_set) if val_set is not None else 0
    rows_tr = np.arange(n_tr)
    kw = {"mean": data.mean, "std": data.std, "interpolation": data.interpolation}
    crop = (cfg["crop_scale"][0], cfg["crop_scale"][1])
    train_ds = CachedImageDataset(cache, rows_tr, labels, train_transform(data.image_size, scale=crop, **kw))
    ev_tf = eval_transform(data.image_size, **kw)
    bs = cfg["batch_size"]
    tr_labels = labels[rows_tr]
    counts = np.bincount(tr_labels, minlength=n_classes)

    def eval_loader(rows: np.ndarray) -> torch.utils.data.DataLoader:
        return make_loader(CachedImageDataset(cache, rows, labels, ev_tf), batch_size=bs, num_workers=workers)

    def loader_for(epoch: int) -> torch.utils.data.DataLoader:
        epoch_seed = seed * 100_003 + epoch
        sampler = None
        if cfg["balanced"]:
            g = torch.Generator()
            g.manual_seed(epoch_seed)
            w = torch.as_tensor(1.0 / counts[tr_labels], dtype=torch.double)
            sampler = torch.utils.data.WeightedRandomSampler(w, num_samples=n_tr, replacement=True, generator=g)
        # A last batch of one image would break BatchNorm in train mode: drop only that one.
        return make_loader(train_ds, batch_size=bs, shuffle=True, seed=epoch_seed, num_workers=workers,
                           sampler=sampler, drop_last=n_tr > 1 and n_tr % bs == 1)

    return _Data(files=files, labels=labels, n_train=n_tr, n_val=n_val, loader_for=loader_for,
                 eval_loader=eval_loader, rows_test=np.arange(n_tr + n_val, len(files)))


def _check_train_args(images: LabeledImages, val_images: LabeledImages | None, *, epochs: int | None,
                      batch_size: int | None, lr: float | None, val_fraction: float, seed: int,
                      num_workers: int | None, crop_scale: tuple[float, float]) -> None:
    owner = "train_on_labels"
    check_param(owner, "images", type(images).__name__, isinstance(images, LabeledImages), "a LabeledImages")
    check_param(owner, "epochs", epochs, epochs is None or (isinstance(epochs, int) and epochs >= 1),
                "None or an int >= 1")
    check_param(owner, "batch_size", batch_size,
                batch_size is None or (isinstance(batch_size, int) and batch_size >= 1), "None or an int >= 1")
    check_param(owner, "lr", lr, lr is None or (isinstance(lr, (int, float)) and lr > 0), "None or a float > 0")
    check_param(owner, "val_fraction", val_fraction,
                isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1, "a float in [0, 1)")
    check_param(owner, "seed", seed, isinstance(seed, int) and seed >= 0, "a non-negative int")
    check_param(owner, "num_workers", num_workers, num_workers is None or (isinstance(num_workers, int)
                                                                          and num_workers >= 0), "None or an int >= 0")
    check_param(owner, "crop_scale", crop_scale, isinstance(crop_scale, (tuple, list)) and len(crop_scale) == 2
                and 0 < crop_scale[0] <= crop_scale[1] <= 1, "a pair 0 < min <= max <= 1")
    if len(images) == 0:
        raise DataError(f"{images.source}: no images to train on. Keep at least one row per class.")
    if val_images is not None and list(val_images.classes) != list(images.classes):
        raise DataError(f"{val_images.source}: the validation set's class list differs from the training set's. "
                        "Load it with classes=<training classes>.")


def train_on_labels(
    images: LabeledImages,
    *,
    backbone: str | ModelSpec,
    out_dir: str | os.PathLike[str] | None = None,
    pretrained: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    optimizer: str | None = None,
    warmup_epochs: float = 0,
    val_images: LabeledImages | None = None,
    val_fraction: float = 0.1,
    test_images: LabeledImages | None = None,
    balanced: bool = False,
    freeze_bn: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    amp: str = "auto",
    image_size: int | None = None,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    num_workers: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    clip_head: str = "linear",
    resume: bool = True,
    source: str | None = None,
) -> TrainReport:
    """Fine-tune ``backbone`` on ``images`` with their labels, validate, and export.

    Parameters
    ----------
    images : LabeledImages
        Training images and labels; ``images.classes`` is the classifier's class list.
    backbone : str or ModelSpec
        Any model name :func:`labelsieve.models.loader.parse_model` understands (a timm name or alias,
        an open_clip model or local folder for its image tower), or a parsed spec.
    out_dir : path, optional
        Export folder (``model.safetensors``, ``model.json``) and checkpoint location; None trains
        without exporting or checkpointing.
    pretrained : str, optional
        The backbone's weights (:mod:`labelsieve.models.loader`): ``None`` its default weights
        (downloaded; offline, pass a file), a file, a tag, or ``"none"`` for random initialisation.
    epochs, batch_size, lr, weight_decay, optimizer : optional
        Override the backbone's defaults (:func:`labelsieve.models.classifiers.train_defaults`).
    warmup_epochs : float
        Linear warm-up before the cosine decay.
    val_images : LabeledImages, optional
        Validation set (same class list); without it a stratified ``val_fraction`` of ``images`` is
        held out.
    val_fraction : float in [0, 1)
        Held-out fraction when ``val_images`` is None; 0 trains on everything, without validation.
    test_images : LabeledImages, optional
        Scored once at the end with the exported weights (``TrainReport.test_acc``).
    balanced : bool
        Draw training batches class-balanced (``WeightedRandomSampler``, weights ``1 / class count``,
        with replacement, one epoch = as many draws as training images).
    freeze_bn : bool
        Keep BatchNorm running statistics at their pretrained values while training (see
        :class:`~labelsieve.core.engine.Trainer`); no effect on backbones without BatchNorm.
    seed : int
        Seeds the split, the initialisation of the head, the batch order and the augmentations.
    device : str or torch.device, optional
        ``None``: CUDA if available.
    amp : {"auto", "bf16", "fp16", "off"}
        Mixed precision on CUDA (see :class:`~labelsieve.core.engine.Trainer`).
    image_size : int, optional
        Training/evaluation size (default: the backbone's).
    crop_scale : tuple of float
        Area range of the random resized crop.
    num_workers : int, optional
        DataLoader workers for decoding and augmentation (default ``min(8, cpu_count - 1)``).
    cache_dir : path, optional
        Where the decoded-image cache lives (default :func:`labelsieve.features.default_cache_dir`).
    progress : bool
        Progress bars and per-epoch log lines.
    clip_head : {"linear", "zero_shot"}
        CLIP towers: ``"linear"`` (the DEFT authors' phase 2) a fresh head on the pre-projection features
        with only the tower's blocks and the head trained; ``"zero_shot"`` a head on the projected
        embedding initialised from the class names' text embeddings, the whole tower trained (see
        :mod:`labelsieve.models.classifiers`).
    resume : bool
        Resume from ``out_dir/checkpoint.safetensors`` when it holds a run with the same settings and data.
    source : str, optional
        Where the labels came from (recorded in model.json).

    Returns
    -------
    TrainReport
    """
    _check_train_args(images, val_images, epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction,
                      seed=seed, num_workers=num_workers, crop_scale=crop_scale)
    t0 = time.perf_counter()
    device = resolve_device(device)
    distributed.init(device)  # under torchrun: every rank trains its share of each batch (DDP)
    seed_everything(seed)
    spec = resolve_backbone(backbone, pretrained)
    cfg = _training_config(spec, optimizer=optimizer, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                           epochs=epochs, warmup_epochs=warmup_epochs, balanced=balanced, freeze_bn=freeze_bn,
                           crop_scale=crop_scale, seed=seed)
    weights = spec.file or spec.tag or spec.weights
    if val_images is None:
        tr_idx, va_idx = stratified_split(images.labels, float(val_fraction), seed=seed)
        train_set, val_set = images.subset(tr_idx), (images.subset(va_idx) if len(va_idx) else None)
    else:
        train_set, val_set = images, val_images
    model, data = create_classifier(spec, num_classes=images.n_classes, classnames=images.classnames,
                                    image_size=image_size, clip_head=clip_head)
    cfg.update(image_size=data.image_size, resize_size=data.resize_size)
    if spec.family == "open_clip":
        cfg.update(clip_head=clip_head, trainable=model.trainable)
    workers = num_workers if num_workers is not None else default_num_workers(reserve=1)
    d = _prepare_data([train_set, val_set, test_images], data, cfg, seed=seed, n_classes=images.n_classes,
                      workers=workers, cache_dir=cache_dir, progress=progress)
    opt = make_optimizer(model, name=cfg["optimizer"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                         momentum=cfg["momentum"])
    sched = cosine_schedule(opt, epochs=cfg["epochs"], steps_per_epoch=len(d.loader_for(0)),
                            warmup_epochs=warmup_epochs)
    trainer = Trainer(model, optimizer=opt, scheduler=sched, device=device, amp=amp, progress=progress,
                      desc=f"train {spec.name}", freeze_bn=bool(freeze_bn))
    cfg["device"] = str(trainer.device)
    cfg["amp"] = str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype is not None else "off"
    ckpt = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    if out_dir is not None and progress and distributed.is_main():
        for legacy in LEGACY_CHECKPOINT_NAMES:
            if (Path(out_dir) / legacy).exists():
                warn(f"{Path(out_dir) / legacy} is ignored: checkpoints are now {CHECKPOINT_NAME} (a pickle is "
                     "never read, since loading one can run code). Delete it.")
    key = _config_key({**cfg, "backbone": spec.to_dict(), "classes": images.classes}, d.files, d.labels)
    if ckpt is not None and not resume and ckpt.exists() and distributed.is_main():
        ckpt.unlink()
    distributed.barrier()  # no rank reads a checkpoint rank 0 is removing
    history = trainer.fit(d.loader_for, epochs=cfg["epochs"],
                          val_loader=d.eval_loader(np.arange(d.n_train, d.n_train + d.n_val)) if d.n_val else None,
                          checkpoint_path=ckpt, checkpoint_key=key)
    last_val = history[-1].get("val_acc") if history else None
    exported = "best" if trainer.restore_best() else "last"
    test_acc = trainer.evaluate(d.eval_loader(d.rows_test))["acc"] if len(d.rows_test) else None
    ips = float(np.mean([h["images_per_s"] for h in history])) if history else 0.0
    seconds = time.perf_counter() - t0
    report = TrainReport(best_val_acc=trainer.best_val_acc, last_val_acc=last_val, epochs=cfg["epochs"],
                         n_train=d.n_train, n_val=d.n_val, seconds=seconds,
                         out_dir=Path(out_dir) if out_dir is not None else None, history=history,
                         best_epoch=trainer.best_epoch, exported=exported, test_acc=test_acc, images_per_s=ips,
                         config=cfg)
    if out_dir is not None and distributed.is_main():
        meta = _model_meta(spec, weights, images, data, cfg, report, source=source,
                           val_source=val_images.source if val_images is not None
                           else f"stratified {val_fraction:g} split")
        export_classifier(trainer.model, out_dir, meta)
        if ckpt is not None and ckpt.exists():
            ckpt.unlink()
        if progress:
            best = f"{report.best_val_acc:.3f}" if report.best_val_acc is not None else "n/a"
            console.print(f"exported {escape(str(Path(out_dir) / 'model.safetensors'))} ({exported} epoch; best val "
                          f"acc {best})")
    return report


def _model_meta(spec: ModelSpec, weights: str, images: LabeledImages, data: DataConfig, cfg: dict[str, Any],
                report: TrainReport, *, source: str | None, val_source: str) -> dict[str, Any]:
    """What model.json records about an export."""
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "labelsieve_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "backbone": spec.name,
        "spec": spec.to_dict(),
        "pretrained": weights,
        "clip_config": _clip_config(spec) if spec.family == "open_clip" else None,
        "num_classes": images.n_classes,
        "classes": list(images.classes),
        "classnames": list(images.classnames),
        "preprocessing": {**data.to_dict(), "resize_mode": "shorter side + centre crop"},
        "training": {
            **cfg,
            "n_train": report.n_train,
            "n_val": report.n_val,
            "best_val_acc": report.best_val_acc,
            "last_val_acc": report.last_val_acc,
            "best_epoch": report.best_epoch,
            "exported_weights": report.exported,
            "test_acc": report.test_acc,
            "seconds": round(report.seconds, 3),
            "images_per_s": round(report.images_per_s, 2),
            "labels_source": source or images.source,
            "val_source": val_source,
            "history": report.history,
        },
    }


def train_from_audit(
    audit_csv: str | os.PathLike[str],
    *,
    images_root: str | os.PathLike[str] | None = None,
    backbone: str | ModelSpec,
    out_dir: str | os.PathLike[str],
    pretrained: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    val_csv: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    balanced: bool = False,
    freeze_bn: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    image_size: int | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    drop_unreviewed_flagged: bool = True,
    accept_suggestions: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    amp: str = "auto",
    weight_decay: float | None = None,
    optimizer: str | None = None,
    warmup_epochs: float = 0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    resume: bool = True,
    reviews: Sequence[str | os.PathLike[str] | pd.DataFrame] = (),
    clip_head: str = "linear",
) -> TrainReport:
    """Train a classifier on the rows a reviewed audit keeps, and export it to ``out_dir``.

    Parameters
    ----------
    audit_csv : path
        ``audit.csv`` from ``labelsieve audit``, possibly with a filled ``review`` column.
    images_root : path, optional
        The folder the audit's paths are relative to; default the image root recorded in the
        ``audit.json`` beside ``audit_csv``.
    backbone : str or ModelSpec
        Any model name (see :func:`train_on_labels`); ``"clip"`` is the CLIP model the audit used
        (from ``audit.json``).
    out_dir : path
        Export folder (``model.safetensors``, ``model.json``).
    pretrained : str, optional
        The backbone's weights (see :func:`train_on_labels`).
    epochs, batch_size, lr : optional
        Override the backbone's defaults.
    val_csv : path, optional
        ``path,label`` CSV of validation images under ``images_root``; default a stratified
        ``val_fraction`` of the kept rows.
    val_fraction : float in [0, 1)
    balanced : bool
        Class-balanced batches.
    freeze_bn : bool
        Keep BatchNorm running statistics fixed (see :func:`train_on_labels`).
    seed : int
    device : str or torch.device, optional
    image_size : int, optional
    num_workers : int, optional
    progress : bool
    drop_unreviewed_flagged, accept_suggestions : bool
        What to do with flagged rows nobody reviewed (see :func:`labelsieve.audit.review.kept_rows`). By
        default they are dropped: training uses the rows the audit kept, which is the detector's
        decision wherever no reviewer overrode it. ``drop_unreviewed_flagged=False`` keeps them
        with their given label; ``accept_suggestions=True`` (with it False) relabels them to the
        suggestion.
    cache_dir : path, optional
        Decoded-image cache location.
    amp : {"auto", "bf16", "fp16", "off"}
    weight_decay, optimizer : optional
        Override the backbone's defaults.
    warmup_epochs : float
        Linear warm-up before the cosine decay.
    crop_scale : tuple of float
        Area range of the random resized crop.
    resume : bool
        Resume an interrupted run of the same settings from ``out_dir/checkpoint.safetensors``.
    reviews : sequence of paths or DataFrames
        Decisions made outside the audit's ``review`` column (reviews CSVs downloaded from audit.html),
        merged onto it first as ``labelsieve apply --reviews`` does
        (:func:`labelsieve.audit.decisions.merge_reviews`).
    clip_head : {"linear", "zero_shot"}
        CLIP towers: the head (see :func:`train_on_labels`).

    Returns
    -------
    TrainReport

    Raises
    ------
    DataError
        Unreadable audit, unknown review values, no rows kept, a kept class with fewer than
        :data:`MIN_IMAGES_PER_CLASS` images, or kept paths that are missing under ``images_root`` or point
        outside it (``..``, absolute paths, symbolic links: the rule of
        :func:`labelsieve.core.paths.check_image_paths`).
    OutputError
        Before any work, when ``out_dir`` (or ``cache_dir``) cannot be written.
    """
    audit_path = Path(audit_csv)
    check_output_dir(out_dir, what="the model folder (-o)")
    if cache_dir is not None:
        check_output_dir(cache_dir, what="the cache folder")
    table, record = open_audit(audit_path)  # one audit: identity and labels checked (labelsieve.audit.auditset)
    for extra in reviews:
        frame = extra if isinstance(extra, pd.DataFrame) else read_reviews(extra)
        table = merge_reviews(table, frame, where=str(audit_path))
    stored = record.get("input") or {}
    in_containers = stored.get("kind", "files") != "files"
    root = audit_image_root(audit_path, images_root, record) if not in_containers else Path(stored.get("root", "."))
    spec = resolve_backbone(backbone, pretrained, audit_model=record.get("model"))
    kept = kept_rows(table, classes=record_classes(record), drop_unreviewed_flagged=drop_unreviewed_flagged,
                     accept_suggestions=accept_suggestions, source=str(audit_path))
    for note in sheet_vs_record(table, record, where=str(audit_path))[1]:
        warn(note)
    if len(kept) == 0:
        raise DataError(f"{audit_path}: the review keeps no rows (every row is dropped or unreadable). Keep at "
                        "least some rows to train on.")
    paths = kept["path"].tolist()
    line_of = dict(zip(table["path"], table.index, strict=True))
    members = None
    if in_containers:  # images inside WebDataset shards or Parquet/Arrow files
        containers = str(images_root) if images_root is not None else str(stored.get("containers", ""))
        found = open_samples(containers, paths, image_column=stored.get("image_column") or "image", cache_dir=cache_dir,
                             where=str(audit_path), lines=[line_of.get(p, 0) for p in paths])
        root, members = found.root, found.members
    else:
        try:
            check_image_paths(root, paths, lines=[line_of.get(p, 0) for p in paths], where=str(audit_path))
        except DataError as exc:
            raise DataError(f"{exc} (Kept rows of the audit; give the image folder the audit was made from with "
                            "--images.)") from None
    classes = set(table["given_label"].tolist()) | set(kept["label"].tolist())
    if "suggested_label" in table.columns:
        classes |= set(table["suggested_label"].tolist())
    counts = kept["label"].value_counts()
    gone = sorted(c for c in classes if c != "" and c not in counts.index)
    if gone:
        warn(f"{audit_path}: the review keeps no image of {len(gone)} class(es) ({listed(gone)}); the model "
             "will not have them.")
    few = sorted((c, int(n)) for c, n in counts.items() if n < MIN_IMAGES_PER_CLASS)
    class_list = sorted(counts.index.tolist())
    index = {c: i for i, c in enumerate(class_list)}
    images = LabeledImages(root=root, paths=paths, labels=np.array([index[y] for y in kept["label"]], dtype=np.int64),
                           classes=class_list, classnames=[default_classname(c) for c in class_list],
                           source=str(audit_path.resolve()), members=members)
    val_images = None
    if val_csv is not None:
        val_root = root if members is None else members.spec
        val_images = load_images(val_root, val_csv, classes=class_list, allow_single_class=True,
                                 image_column=members.image_column or "image" if members is not None else "image",
                                 cache_dir=cache_dir)
    if few:
        raise DataError(f"{audit_path}: {len(few)} class(es) keep fewer than {MIN_IMAGES_PER_CLASS} images "
                        f"({listed([f'{c!r}: {n}' for c, n in few])}); a classifier cannot learn or be validated on "
                        "a class from one image. Keep more images of those classes, or relabel or drop their "
                        "last image.")
    return train_on_labels(images, backbone=spec, out_dir=out_dir, epochs=epochs,
                           batch_size=batch_size, lr=lr, val_images=val_images, val_fraction=val_fraction,
                           balanced=balanced, freeze_bn=freeze_bn, seed=seed, device=device, amp=amp,
                           image_size=image_size, num_workers=num_workers, cache_dir=cache_dir, progress=progress,
                           source=str(audit_path.resolve()),
                           weight_decay=weight_decay, optimizer=optimizer, warmup_epochs=warmup_epochs,
                           crop_scale=crop_scale, resume=resume, clip_head=clip_head)


def audit_image_root(audit_csv: Path, images_root: str | os.PathLike[str] | None, record: dict[str, Any]) -> Path:
    """The folder an audit's paths are relative to: ``images_root`` when given, else the audit's recorded root.

    Raises
    ------
    DataError
        When neither is usable, with what to do.
    """
    if images_root is not None:
        root = Path(images_root).expanduser()
        if not root.is_dir():
            raise DataError(f"Image folder not found: {root}. Give the folder the paths in {audit_csv} are relative "
                            "to.")
        return root.resolve()
    recorded = (record.get("input") or {}).get("root")
    if not recorded:
        raise DataError(f"{audit_csv}: no audit.json beside it records the image folder. Pass --images with the "
                        "folder the audit's paths are relative to.")
    root = Path(recorded)
    if not root.is_dir():
        raise DataError(f"{audit_csv}: the audit was made on images in {root}, which no longer exists (moved or "
                        "unmounted?). Pass --images with the folder's new location.")
    return root
