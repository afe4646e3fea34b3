"""Classifier backbones for the adaptation phase: any timm model by name, or a CLIP image tower.

``create_classifier(name, num_classes=...)`` is the one way in. ``name`` is a timm model name (with
an optional pretrained tag, ``convnext_tiny.fb_in1k``), one of the short aliases in
:data:`BACKBONE_ALIASES`, or ``"clip"`` for the image tower of a CLIP model with a new linear head
(full fine-tuning, DEFT's phase 2). Preprocessing (mean, std, size, interpolation, crop fraction)
is read from the model, never guessed.

Weights (``pretrained``)
    ``None`` or ``"none"``: random initialisation. A path to a ``.safetensors``/``.pth``/``.bin``/
    ``.npz`` file in timm's layout for that architecture: loaded offline (the classifier layer is
    replaced when ``num_classes`` differs). ``"default"``: timm's default pretrained weights for the
    name, downloaded from the Hugging Face hub. Any other string: a timm pretrained tag
    (``"a1_in1k"``), downloaded likewise. With pretrained weights the new classification layer starts
    at zero (see :func:`_zero_head`). A failed download (e.g. offline, ``HF_HUB_OFFLINE=1``)
    raises :class:`~labelsieve.errors.ModelError` telling the user to pass ``--pretrained PATH``.

Training defaults (:data:`TRAIN_DEFAULTS`)
    The per-backbone optimiser settings of DEFT's full fine-tuning phase, as set in the authors'
    ``main_phase2.py`` and ``config/FFT/*.yaml`` (the paper's appendix table of training details):
    batch 64, 10 epochs, cosine schedule; ResNet-50 AdamW lr 1e-3 wd 1e-5; ConvNeXt-T AdamW lr 1e-4
    wd 1e-4; ViT-B/16 SGD lr 1e-2 wd 1e-5 (no momentum in the authors' code); MAE ViT-B/16 AdamW
    lr 1e-4 wd 1e-3; CLIP image tower SGD lr 5e-4 wd 5e-4 momentum 0.9. Any other backbone gets
    :data:`FALLBACK_DEFAULTS` (AdamW, lr 1e-3, wd 1e-5 — the ResNet-50 setting, which suits ImageNet
    CNNs such as EfficientNet), recorded with ``source="fallback"``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labelsieve.errors import ModelError, check_param

__all__ = [
    "BACKBONE_ALIASES",
    "FALLBACK_DEFAULTS",
    "TRAIN_DEFAULTS",
    "CLIPImageClassifier",
    "DataConfig",
    "create_classifier",
    "list_backbone_aliases",
    "resolve_backbone",
    "train_defaults",
]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz", ".ckpt")

#: Short names -> timm model names (with the pretrained tag the DEFT code uses where it names one).
BACKBONE_ALIASES: dict[str, str] = {
    "resnet50": "resnet50",
    "resnet": "resnet50.a1_in1k",
    "convnext_t": "convnext_tiny",
    "convnext": "convnext_tiny.fb_in1k",
    "vit_b16": "vit_base_patch16_224",
    "vit": "vit_base_patch16_224.augreg_in1k",
    "mae_vit_base": "vit_base_patch16_224.mae",
    "mae": "vit_base_patch16_224.mae",
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "lite0": "tf_efficientnet_lite0",
}

_DEFT = "DEFT main_phase2.py / config/FFT (paper appendix)"
#: Per-backbone fine-tuning settings of DEFT's phase 2, keyed by timm architecture (``"clip"`` for a
#: CLIP image tower). ``schedule`` is cosine over ``epochs`` in every case.
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "resnet50": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-5, "momentum": 0.9, "batch_size": 64,
                 "epochs": 10, "source": _DEFT},
    "convnext_tiny": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-4, "momentum": 0.9, "batch_size": 64,
                      "epochs": 10, "source": _DEFT},
    "vit_base_patch16_224": {"optimizer": "sgd", "lr": 1e-2, "weight_decay": 1e-5, "momentum": 0.0,
                             "batch_size": 64, "epochs": 10, "source": _DEFT},
    "vit_base_patch16_224.mae": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-3, "momentum": 0.9,
                                 "batch_size": 64, "epochs": 10, "source": _DEFT},
    "clip": {"optimizer": "sgd", "lr": 5e-4, "weight_decay": 5e-4, "momentum": 0.9, "batch_size": 64,
             "epochs": 10, "source": _DEFT},
}
#: Settings for backbones the paper does not cover.
FALLBACK_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-5, "momentum": 0.9,
                                     "batch_size": 64, "epochs": 10, "source": "fallback"}


@dataclass(frozen=True)
class DataConfig:
    """How a backbone wants its images.

    Attributes
    ----------
    mean, std : tuple of 3 floats
        Normalisation.
    image_size : int
        Input side in pixels.
    interpolation : str
        ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
    crop_pct : float
        Evaluation crop fraction: images are resized to :attr:`resize_size` and centre-cropped to
        :attr:`image_size` (timm's convention; 1.0 for CLIP).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    @property
    def resize_size(self) -> int:
        """Side of the resized image before the centre crop: ``floor(image_size / crop_pct)``."""
        return int(math.floor(self.image_size / self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (plus ``resize_size``)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["resize_size"] = self.resize_size
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
                   image_size=int(d["image_size"]), interpolation=str(d.get("interpolation", "bicubic")),
                   crop_pct=float(d.get("crop_pct", 1.0)))


class CLIPImageClassifier(nn.Module):
    """A CLIP image tower with a linear head on its (unnormalised, projected) image embedding.

    With zero-shot initialisation the head's weights are the normalised class text embeddings and
    its bias zero, so before training ``logits = image_embedding @ text_embeddings.T`` — the zero-shot
    ranking; DEFT's code initialises its head the same way.

    Parameters
    ----------
    visual : nn.Module
        open_clip's ``model.visual`` (maps images to the joint embedding space).
    embed_dim : int
    num_classes : int
    head_init : Tensor of shape (num_classes, embed_dim), optional
    """

    def __init__(self, visual: nn.Module, embed_dim: int, num_classes: int,
                 head_init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(embed_dim, num_classes)
        if head_init is not None:
            with torch.no_grad():
                self.head.weight.copy_(head_init.to(self.head.weight))
                self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(x))


def list_backbone_aliases() -> dict[str, str]:
    """The short backbone names and the timm names they stand for (``"clip"`` is separate)."""
    return dict(BACKBONE_ALIASES)


def resolve_backbone(name: str) -> str:
    """The timm model name (possibly with a pretrained tag) for ``name`` or its alias.

    Raises
    ------
    ModelError
        If timm has no such architecture (the message suggests close names).
    """
    check_param("resolve_backbone", "name", name, isinstance(name, str) and bool(name.strip()), "a model name")
    key = name.strip()
    if key.lower() == "clip":
        return "clip"
    full = BACKBONE_ALIASES.get(key.lower(), key)
    import timm

    arch = full.split(".")[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, list(BACKBONE_ALIASES) + timm.list_models(), n=5, cutoff=0.6)
        raise ModelError(f"Unknown backbone {name!r}: not a timm model name nor one of the aliases "
                         f"{', '.join(sorted(BACKBONE_ALIASES))}, nor 'clip'."
                         + (f" Did you mean: {', '.join(close)}?" if close else "")
                         + " timm.list_models('*pattern*') lists timm's names.")
    return full


def train_defaults(name: str) -> dict[str, Any]:
    """Optimiser defaults for backbone ``name`` (alias, timm name or ``"clip"``).

    Returns a copy of the matching :data:`TRAIN_DEFAULTS` entry (exact timm name first, then the
    architecture without its tag), else of :data:`FALLBACK_DEFAULTS`; ``"key"`` says which entry.
    """
    full = resolve_backbone(name)
    for key in (full, full.split(".")[0]):
        if key in TRAIN_DEFAULTS:
            return {**TRAIN_DEFAULTS[key], "key": key}
    return {**FALLBACK_DEFAULTS, "key": "fallback"}


def _looks_like_path(value: str) -> bool:
    return value.lower().endswith(WEIGHT_SUFFIXES) or os.sep in value or "/" in value or value.startswith("~")


def _create_timm(full: str, *, num_classes: int, pretrained: str | None,
                 image_size: int | None) -> tuple[nn.Module, DataConfig]:
    import timm

    kwargs: dict[str, Any] = {"num_classes": num_classes}
    what = "random initialisation"
    model_name = full
    src = None if pretrained is None or pretrained.strip().lower() in ("", "none") else pretrained.strip()
    if src is not None:
        p = Path(src).expanduser()
        if p.is_file():
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(p.resolve())})
            what = f"weight file {p}"
        elif _looks_like_path(src):
            raise ModelError(f"Weight file not found: {src}. Pass --pretrained with the path of an existing "
                             f"weight file for {full} (.safetensors or .pth in timm's layout), or --pretrained "
                             "none for random initialisation.")
        else:
            if src.lower() not in ("default", "timm"):
                model_name = f"{full.split('.')[0]}.{src}"
            kwargs["pretrained"] = True
            what = f"pretrained weights {model_name!r} from the Hugging Face hub"
    try:
        model = timm.create_model(model_name, **kwargs)
    except Exception as exc:
        if kwargs.get("pretrained_cfg_overlay"):
            raise ModelError(f"Cannot load {what} into timm model {full!r}: {exc}. Check that the file holds "
                             f"weights of {full.split('.')[0]} in timm's layout.") from exc
        if kwargs.get("pretrained"):
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise ModelError(f"Cannot get {what}{offline}: {type(exc).__name__}: {reason}. Download the weights "
                             "once where the network is reachable and pass the file with --pretrained PATH, "
                             "or use --pretrained none for random initialisation.") from exc
        raise ModelError(f"Cannot build timm model {model_name!r}: {exc}") from exc
    pretrained_classes = int(getattr(model, "pretrained_cfg", {}).get("num_classes", -1) or -1)
    if kwargs.get("pretrained") and pretrained_classes != num_classes:
        _zero_head(model)  # the head was replaced, not loaded
    if image_size is not None and hasattr(model, "set_input_size"):
        try:
            model.set_input_size(img_size=image_size)
        except Exception as exc:
            raise ModelError(f"{full} cannot run at {image_size}px ({exc}). Choose another --image-size.") from exc
    cfg = timm.data.resolve_model_data_config(model)
    size = int(image_size if image_size is not None else cfg["input_size"][-1])
    data = DataConfig(mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
                      image_size=size, interpolation=str(cfg.get("interpolation", "bicubic")),
                      crop_pct=float(cfg.get("crop_pct", 1.0) or 1.0))
    return model, data


def _zero_head(model: nn.Module) -> None:
    """Start the new classification layer of a pretrained timm model at zero.

    timm's default initialisation of a replaced head gives logits of several units on pretrained
    features (cross-entropy 4.6 instead of log(C) on Imagenette with EfficientNet-Lite0), which the
    first steps spend undoing while their gradient disturbs the pretrained trunk; a zero head starts
    at the uniform prediction (the fine-tuning recipes of MAE/BEiT scale the head init down for the
    same reason).
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()


def _clip_from_config(model_cfg: dict[str, Any]) -> nn.Module:
    """An open_clip model built (randomly initialised, offline) from an ``open_clip_config.json``
    ``model_cfg`` dict."""
    import open_clip

    blob = json.dumps(model_cfg, sort_keys=True)
    name = "labelsieve-clip-" + hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()
    if name not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.json"
            path.write_text(blob)
            open_clip.add_model_config(path)
    return open_clip.create_model(name, pretrained=None)


def _create_clip(*, num_classes: int, clip_model: str | None, clip_pretrained: str | None,
                 classnames: Sequence[str] | None, image_size: int | None,
                 clip_config: dict[str, Any] | None) -> tuple[nn.Module, DataConfig]:
    if not clip_model:
        raise ModelError("Backbone 'clip' needs a CLIP model: pass --clip-model (an open_clip architecture such "
                         "as ViT-B-16 with --clip-pretrained, or a local open_clip model folder).")
    from labelsieve.models.encoders import DEFAULT_PRETRAINED, create_encoder

    local = Path(clip_model).expanduser()
    if clip_config is not None and not local.exists():
        clip = _clip_from_config(clip_config["model_cfg"])
        pre = clip_config.get("preprocess_cfg", {})
        import open_clip

        mean = tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(pre.get("std", open_clip.OPENAI_DATASET_STD))
        native = int(pre.get("size", clip_config["model_cfg"].get("vision_cfg", {}).get("image_size", 224)))
        embed_dim = int(clip_config["model_cfg"]["embed_dim"])
        head_init = None
    else:
        if clip_pretrained is None:
            tag: str | None = DEFAULT_PRETRAINED
        elif clip_pretrained.strip().lower() == "none":
            tag = None
        else:
            tag = clip_pretrained
        enc = create_encoder(clip_model, pretrained=tag, device="cpu")
        clip, mean, std, native, embed_dim = enc.model, enc.mean, enc.std, enc.image_size, enc.embed_dim
        head_init = None
        if classnames is not None:
            if len(classnames) != num_classes:
                raise ModelError(f"{len(classnames)} class names given for {num_classes} classes; give one name "
                                 "per class.")
            head_init = torch.from_numpy(enc.class_text_embeddings(list(classnames), ["a photo of a {}."]))
    visual = clip.visual
    size = int(image_size if image_size is not None else native)
    if size != native:
        import open_clip

        if isinstance(visual, open_clip.transformer.VisionTransformer):
            raise ModelError(f"The CLIP image tower of {clip_model!r} is a ViT fixed at {native}px; it cannot "
                             f"train at --image-size {size}. Leave --image-size unset.")
    model = CLIPImageClassifier(visual, embed_dim, num_classes, head_init=head_init)
    data = DataConfig(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),  # type: ignore[arg-type]
                      image_size=size, interpolation="bicubic", crop_pct=1.0)
    return model, data


def create_classifier(
    name: str,
    *,
    num_classes: int,
    pretrained: str | None = None,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    classnames: Sequence[str] | None = None,
    image_size: int | None = None,
    clip_config: dict[str, Any] | None = None,
) -> tuple[nn.Module, DataConfig]:
    """Build an image classifier and say how it wants its images.

    Parameters
    ----------
    name : str
        A timm model name (optionally with a tag), an alias (:func:`list_backbone_aliases`) or
        ``"clip"``.
    num_classes : int
        Outputs of the new classification layer (>= 1).
    pretrained : str, optional
        timm weights, see the module docstring (``None``/``"none"``: random initialisation).
    clip_model : str, optional
        For ``name="clip"``: the CLIP model (architecture name or local open_clip folder) passed to
        :func:`labelsieve.models.encoders.create_encoder`.
    clip_pretrained : str, optional
        For ``name="clip"``: its weight tag or file (``None``: the encoder's default, ``"openai"``
        for architecture names; ``"none"``: random initialisation, e.g. before loading a saved
        classifier).
    classnames : sequence of str, optional
        For ``name="clip"``: initialise the head from the zero-shot text embeddings of
        ``"a photo of a {}."`` (one name per class).
    image_size : int, optional
        Train/evaluate at this size instead of the model's native one (timm ViTs have their
        position embeddings resampled; CNNs take any size; CLIP ViT towers refuse).
    clip_config : dict, optional
        ``open_clip_config.json`` contents used to rebuild a CLIP tower (random weights) when
        ``clip_model`` is a folder that no longer exists (loading an exported classifier).

    Returns
    -------
    model : nn.Module
        On CPU, float32, in train mode; maps (B, 3, S, S) to logits (B, num_classes).
    data : DataConfig
        Its preprocessing.

    Raises
    ------
    ModelError
        Unknown name, missing weight file, weights that do not fit, or a failed download.
    """
    owner = "create_classifier"
    check_param(owner, "num_classes", num_classes, isinstance(num_classes, int) and num_classes >= 1, "an int >= 1")
    check_param(owner, "image_size", image_size,
                image_size is None or (isinstance(image_size, int) and image_size >= 16), "None or an int >= 16")
    check_param(owner, "pretrained", pretrained, pretrained is None or isinstance(pretrained, (str, os.PathLike)),
                "None, 'none', 'default', a timm tag or a weight file path")
    full = resolve_backbone(name)
    if full == "clip":
        return _create_clip(num_classes=num_classes, clip_model=clip_model, clip_pretrained=clip_pretrained,
                            classnames=classnames, image_size=image_size, clip_config=clip_config)
    return _create_timm(full, num_classes=num_classes, pretrained=None if pretrained is None else str(pretrained),
                        image_size=image_size)
