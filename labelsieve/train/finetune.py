"""Fine-tune a classifier on the images an audit kept (``labelsieve train``), and export it.

:func:`train_from_audit` reads a reviewed ``audit.csv``, keeps the rows the review rule keeps
(:func:`labelsieve.review.kept_rows`: non-flagged rows and reviewed decisions; ``drop``, unreadable
and — by default — flagged rows nobody reviewed removed), and calls :func:`train_on_labels`, which
benchmarks also use directly to train on all noisy labels or on the true labels for comparison.

Training follows DEFT's adaptation phase: full fine-tuning of the whole backbone with a new linear
head, the backbone's optimiser settings (:data:`labelsieve.models.backbones.TRAIN_DEFAULTS`), a
cosine schedule, random resized crop + horizontal flip, cross-entropy. Images are decoded once into
a :class:`~labelsieve.imagecache.DecodedImageCache` at ``floor(image_size / crop_pct)`` pixels;
training crops come from it, evaluation is its centre ``image_size`` crop (timm's evaluation
transform). A stratified ``val_fraction`` of the kept rows (or a separate ``val_csv``) is held out;
the export holds the weights of the epoch with the best validation accuracy (the last epoch when
there is no validation set), and ``model.json`` records best and last accuracy.

Export (``out_dir``)::

    model.safetensors   the classifier's weights
    model.json          classes, backbone, weights source, preprocessing, training record
    checkpoint.pt       only while training (resume by rerunning the same command); removed at the end
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labelsieve.data import LabeledImages, default_classname, load_images
from labelsieve.errors import DataError, check_param
from labelsieve.imagecache import CachedImageDataset, DecodedImageCache, eval_transform, train_transform
from labelsieve.progress import console
from labelsieve.train.engine import Trainer, cosine_schedule, make_loader, make_optimizer, seed_everything

__all__ = ["MODEL_FORMAT", "TrainReport", "export_classifier", "stratified_split", "train_from_audit",
           "train_on_labels"]

MODEL_FORMAT = "labelsieve-classifier"
MODEL_FORMAT_VERSION = 1
_MAX_LISTED = 5


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
        Per-epoch records of :meth:`labelsieve.train.engine.Trainer.fit`.
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


def export_classifier(model: torch.nn.Module, out_dir: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``out_dir`` (each by atomic replace).

    Parameters
    ----------
    model : nn.Module
    out_dir : path
    meta : dict
        JSON-serialisable description (see :func:`train_on_labels` for the fields).

    Returns
    -------
    Path
        The folder.
    """
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp_w = out / f"model.safetensors.{tag}.tmp"
    tmp_j = out / f"model.json.{tag}.tmp"
    try:
        cpu_model = model.to("cpu")
        save_model(cpu_model, str(tmp_w), metadata={"format": MODEL_FORMAT})
        tmp_j.write_text(json.dumps(meta, indent=2, default=_json_default), encoding="utf-8")
        os.replace(tmp_w, out / "model.safetensors")
        os.replace(tmp_j, out / "model.json")
    finally:
        for t in (tmp_w, tmp_j):
            if t.exists():
                t.unlink()
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _clip_config(clip_model: str | None) -> dict[str, Any] | None:
    """The ``open_clip_config.json`` of a local CLIP folder (kept in model.json so predict can rebuild it)."""
    if not clip_model:
        return None
    f = Path(clip_model).expanduser() / "open_clip_config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def train_on_labels(
    images: LabeledImages,
    *,
    backbone: str,
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
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    clip_zero_shot_head: bool = True,
    resume: bool = True,
    source: str | None = None,
) -> TrainReport:
    """Fine-tune ``backbone`` on ``images`` with their labels, validate, and export.

    Parameters
    ----------
    images : LabeledImages
        Training images and labels; ``images.classes`` is the classifier's class list.
    backbone : str
        timm model name or alias, or ``"clip"`` (see :func:`labelsieve.models.backbones.create_classifier`).
    out_dir : path, optional
        Export folder (``model.safetensors``, ``model.json``) and checkpoint location; None trains
        without exporting or checkpointing.
    pretrained : str, optional
        Weights for a timm backbone: a weight file, a timm tag, ``"none"`` (random init); ``None``
        means timm's default pretrained weights (downloaded; offline, pass a file).
    epochs, batch_size, lr, weight_decay, optimizer : optional
        Override the backbone's defaults (:func:`labelsieve.models.backbones.train_defaults`).
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
        :class:`~labelsieve.train.engine.Trainer`); no effect on backbones without BatchNorm.
    seed : int
        Seeds the split, the initialisation of the head, the batch order and the augmentations.
    device : str or torch.device, optional
        ``None``: CUDA if available.
    amp : {"auto", "bf16", "fp16", "off"}
        Mixed precision on CUDA (see :class:`~labelsieve.train.engine.Trainer`).
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
    clip_model, clip_pretrained : str, optional
        For ``backbone="clip"``: the CLIP model and its weights.
    clip_zero_shot_head : bool
        For ``backbone="clip"``: initialise the head from the class names' text embeddings.
    resume : bool
        Resume from ``out_dir/checkpoint.pt`` when it holds a run with the same settings and data.
    source : str, optional
        Where the labels came from (recorded in model.json).

    Returns
    -------
    TrainReport
    """
    from labelsieve import __version__
    from labelsieve.models.backbones import create_classifier, resolve_backbone, train_defaults

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
    t0 = time.perf_counter()
    seed_everything(seed)
    full_name = resolve_backbone(backbone)
    defaults = train_defaults(backbone)
    cfg = {
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
    pre_arg: str | None = None
    if full_name == "clip":
        weights = clip_pretrained or "(encoder default)"
    else:
        pre_arg = "default" if pretrained is None else str(pretrained)
        weights = pre_arg
        if Path(pre_arg).expanduser().is_file():
            weights = str(Path(pre_arg).expanduser().resolve())

    # -- split --------------------------------------------------------------------------------------
    if val_images is None:
        tr_idx, va_idx = stratified_split(images.labels, float(val_fraction), seed=seed)
        train_set = images.subset(tr_idx)
        val_set = images.subset(va_idx) if len(va_idx) else None
    else:
        train_set, val_set = images, val_images
    n_val = len(val_set) if val_set is not None else 0

    # -- model --------------------------------------------------------------------------------------
    model, data = create_classifier(
        full_name, num_classes=images.n_classes, pretrained=pre_arg, clip_model=clip_model,
        clip_pretrained=clip_pretrained, classnames=images.classnames if clip_zero_shot_head else None,
        image_size=image_size)
    cfg["image_size"] = data.image_size
    cfg["resize_size"] = data.resize_size

    # -- decoded images, once ---------------------------------------------------------------------------
    parts = [p for p in (train_set, val_set, test_images) if p is not None]
    files = [str(p.abspath(i)) for p in parts for i in range(len(p))]
    all_labels = np.concatenate([p.labels for p in parts]).astype(np.int64)
    workers = num_workers if num_workers is not None else min(8, max(0, (os.cpu_count() or 1) - 1))
    cache = DecodedImageCache.open(files, size=data.resize_size, mode="crop", cache_dir=cache_dir,
                                   num_workers=workers, progress=progress)
    n_tr = len(train_set)
    rows_tr = np.arange(n_tr)
    rows_va = np.arange(n_tr, n_tr + n_val)
    rows_te = np.arange(n_tr + n_val, len(files))
    kw = {"mean": data.mean, "std": data.std, "interpolation": data.interpolation}
    train_ds = CachedImageDataset(cache, rows_tr, all_labels,
                                  train_transform(data.image_size, scale=tuple(crop_scale), **kw))  # type: ignore[arg-type]
    ev_tf = eval_transform(data.image_size, **kw)
    bs = cfg["batch_size"]

    def eval_loader(rows: np.ndarray) -> torch.utils.data.DataLoader:
        return make_loader(CachedImageDataset(cache, rows, all_labels, ev_tf), batch_size=bs, num_workers=workers)

    val_loader = eval_loader(rows_va) if n_val else None
    tr_labels = all_labels[rows_tr]
    counts = np.bincount(tr_labels, minlength=images.n_classes)

    def loader_for(epoch: int) -> torch.utils.data.DataLoader:
        epoch_seed = seed * 100_003 + epoch
        sampler = None
        if balanced:
            g = torch.Generator()
            g.manual_seed(epoch_seed)
            w = torch.as_tensor(1.0 / counts[tr_labels], dtype=torch.double)
            sampler = torch.utils.data.WeightedRandomSampler(w, num_samples=n_tr, replacement=True, generator=g)
        # A last batch of one image would break BatchNorm in train mode: drop only that one.
        return make_loader(train_ds, batch_size=bs, shuffle=True, seed=epoch_seed, num_workers=workers,
                           sampler=sampler, drop_last=n_tr > 1 and n_tr % bs == 1)

    steps = len(loader_for(0))
    opt = make_optimizer(model, name=cfg["optimizer"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                         momentum=cfg["momentum"])
    sched = cosine_schedule(opt, epochs=cfg["epochs"], steps_per_epoch=steps, warmup_epochs=warmup_epochs)
    trainer = Trainer(model, optimizer=opt, scheduler=sched, device=device, amp=amp, progress=progress,
                      desc=f"train {backbone}", freeze_bn=bool(freeze_bn))
    cfg["device"] = str(trainer.device)
    cfg["amp"] = str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype is not None else "off"

    ckpt = Path(out_dir) / "checkpoint.pt" if out_dir is not None else None
    key = _config_key({**cfg, "backbone": full_name, "weights": weights, "clip_model": clip_model,
                       "classes": images.classes}, files, all_labels)
    if ckpt is not None and not resume and ckpt.exists():
        ckpt.unlink()
    history = trainer.fit(loader_for, epochs=cfg["epochs"], val_loader=val_loader, checkpoint_path=ckpt,
                          checkpoint_key=key)
    last_val = history[-1].get("val_acc") if history else None
    exported = "best" if trainer.restore_best() else "last"
    test_acc = None
    if test_images is not None and len(rows_te):
        test_acc = trainer.evaluate(eval_loader(rows_te))["acc"]
    ips = float(np.mean([h["images_per_s"] for h in history])) if history else 0.0
    seconds = time.perf_counter() - t0
    report = TrainReport(best_val_acc=trainer.best_val_acc, last_val_acc=last_val, epochs=cfg["epochs"], n_train=n_tr,
                         n_val=n_val, seconds=seconds, out_dir=Path(out_dir) if out_dir is not None else None,
                         history=history, best_epoch=trainer.best_epoch, exported=exported, test_acc=test_acc,
                         images_per_s=ips, config=cfg)
    if out_dir is not None:
        meta = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "labelsieve_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "backbone": backbone,
            "architecture": full_name,
            "pretrained": weights,
            "clip_model": str(Path(clip_model).expanduser().resolve()) if clip_model
            and Path(clip_model).expanduser().exists() else clip_model,
            "clip_pretrained": clip_pretrained,
            "clip_config": _clip_config(clip_model) if full_name == "clip" else None,
            "num_classes": images.n_classes,
            "classes": list(images.classes),
            "classnames": list(images.classnames),
            "preprocessing": {**data.to_dict(), "resize_mode": "shorter side + centre crop"},
            "training": {
                **cfg,
                "n_train": n_tr,
                "n_val": n_val,
                "best_val_acc": report.best_val_acc,
                "last_val_acc": report.last_val_acc,
                "best_epoch": report.best_epoch,
                "exported_weights": exported,
                "test_acc": test_acc,
                "seconds": round(seconds, 3),
                "images_per_s": round(ips, 2),
                "labels_source": source or images.source,
                "val_source": val_images.source if val_images is not None else f"stratified {val_fraction:g} split",
                "history": history,
            },
        }
        export_classifier(trainer.model, out_dir, meta)
        if ckpt is not None and ckpt.exists():
            ckpt.unlink()
        if progress:
            best = f"{report.best_val_acc:.3f}" if report.best_val_acc is not None else "n/a"
            console.print(f"exported {Path(out_dir) / 'model.safetensors'} ({exported} epoch; best val acc {best})")
    return report


def train_from_audit(
    audit_csv: str | os.PathLike[str],
    *,
    images_root: str | os.PathLike[str],
    backbone: str,
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
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    drop_unreviewed_flagged: bool = True,
    accept_suggestions: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    amp: str = "auto",
    weight_decay: float | None = None,
    optimizer: str | None = None,
    warmup_epochs: float = 0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    resume: bool = True,
) -> TrainReport:
    """Train a classifier on the rows a reviewed audit keeps, and export it to ``out_dir``.

    Parameters
    ----------
    audit_csv : path
        ``audit.csv`` from ``labelsieve audit``, possibly with a filled ``review`` column.
    images_root : path
        The folder the audit's paths are relative to.
    backbone : str
        timm model name or alias, or ``"clip"``.
    out_dir : path
        Export folder (``model.safetensors``, ``model.json``).
    pretrained : str, optional
        timm weights: a file, a tag, ``"none"``; ``None`` = timm's default (downloaded).
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
    clip_model, clip_pretrained : str, optional
        For ``backbone="clip"``.
    drop_unreviewed_flagged, accept_suggestions : bool
        What to do with flagged rows nobody reviewed (see :func:`labelsieve.review.kept_rows`). By
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
        Resume an interrupted run of the same settings from ``out_dir/checkpoint.pt``.

    Returns
    -------
    TrainReport

    Raises
    ------
    DataError
        Unreadable audit, unknown review values, no rows kept, or image files missing under
        ``images_root``.
    """
    from labelsieve.review import kept_rows, read_audit

    audit_path = Path(audit_csv)
    root = Path(images_root).expanduser()
    if not root.is_dir():
        raise DataError(f"Image folder not found: {root}. Give the folder the paths in {audit_path} are relative to.")
    root = root.resolve()
    table = read_audit(audit_path)
    kept = kept_rows(table, drop_unreviewed_flagged=drop_unreviewed_flagged,
                     accept_suggestions=accept_suggestions, source=str(audit_path))
    if len(kept) == 0:
        raise DataError(f"{audit_path}: the review keeps no rows (every row is dropped or unreadable). Keep at "
                        "least some rows to train on.")
    classes = set(table["given_label"].tolist()) | set(kept["label"].tolist())
    if "suggested_label" in table.columns:
        classes |= set(table["suggested_label"].tolist())
    class_list = sorted(c for c in classes if c != "")
    paths = kept["path"].tolist()
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        shown = ", ".join(missing[:_MAX_LISTED]) + (" …" if len(missing) > _MAX_LISTED else "")
        raise DataError(f"{audit_path}: {len(missing)} kept image(s) not found under {root} ({shown}). Give the "
                        "image folder the audit was made from with --images.")
    index = {c: i for i, c in enumerate(class_list)}
    images = LabeledImages(root=root, paths=paths, labels=np.array([index[y] for y in kept["label"]], dtype=np.int64),
                           classes=class_list, classnames=[default_classname(c) for c in class_list],
                           source=str(audit_path.resolve()))
    val_images = None
    if val_csv is not None:
        val_images = load_images(root, val_csv, classes=class_list, allow_single_class=True)
    return train_on_labels(images, backbone=backbone, out_dir=out_dir, pretrained=pretrained, epochs=epochs,
                           batch_size=batch_size, lr=lr, val_images=val_images, val_fraction=val_fraction,
                           balanced=balanced, freeze_bn=freeze_bn, seed=seed, device=device, amp=amp,
                           image_size=image_size, num_workers=num_workers, cache_dir=cache_dir, progress=progress,
                           clip_model=clip_model, clip_pretrained=clip_pretrained, source=str(audit_path.resolve()),
                           weight_decay=weight_decay, optimizer=optimizer, warmup_epochs=warmup_epochs,
                           crop_scale=crop_scale, resume=resume)
