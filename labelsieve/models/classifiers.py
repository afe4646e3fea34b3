"""Classifiers for the adaptation phase (``labelsieve train``): any timm model, or a CLIP image tower.

``create_classifier(model, num_classes=...)`` is the one way in. ``model`` is any name the model
loader understands (:mod:`labelsieve.models.loader`): a timm name or alias (``convnext_tiny.fb_in1k``,
``lite0``) gives that timm model with a new head; an open_clip model (``ViT-B-16``, a local open_clip
folder) gives its image tower with a new linear head (DEFT's phase 2).

CLIP heads (``clip_head``)
    ``"linear"`` (default; the DEFT authors' phase 2, ``model/CLIP.py`` ``ViT_Tuner``): a fresh
    ``nn.Linear`` (PyTorch's default initialisation) on the **pre-projection** features — ``ln_post`` of
    the class token for a ViT tower, the pooled trunk features for a timm tower inside open_clip
    (the mini CLIP's EfficientNet) — and only the tower's blocks and the head train: the ViT's
    transformer blocks (its patch embedding, class and position embeddings, ``ln_pre``, ``ln_post`` stay
    frozen and ``proj`` is dropped), a timm trunk's ``blocks`` (its stem and last conv/norm stay
    frozen). Towers of any other kind (open_clip's ModifiedResNet) keep their projection and train
    whole; ``CLIPImageClassifier.trainable`` says which rule applied.
    ``"zero_shot"`` (labelsieve's option): a head on the projected image embedding initialised from
    the class names' zero-shot text embeddings (``"a photo of a {}."``), so training starts from CLIP's
    zero-shot prediction; the whole tower trains.
Preprocessing (mean, std, size, interpolation, crop fraction) is read from the model, never guessed.
``pretrained`` means what it means everywhere (the loader's module docstring); with pretrained timm
weights the new classification layer starts at zero (see :func:`_zero_head`).

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

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import open_clip
import timm
import torch
from torch import nn

from labelsieve.core.errors import ModelError, check_param
from labelsieve.models.loader import ModelSpec, create_timm, load_open_clip, open_clip_from_config, parse_model

__all__ = [
    "CLIP_HEADS",
    "FALLBACK_DEFAULTS",
    "TRAIN_DEFAULTS",
    "CLIPImageClassifier",
    "DataConfig",
    "create_classifier",
    "train_defaults",
]

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


#: The heads a CLIP image tower can get (see the module docstring).
CLIP_HEADS = ("linear", "zero_shot")


def _pre_projection(visual: nn.Module) -> tuple[int, list[nn.Module], str] | None:
    """(pre-projection width, the modules the authors' phase 2 trains, rule) for the towers where both are
    known; None otherwise. A ViT tower's ``proj`` is removed here (its output becomes ``ln_post`` of the
    pooled token)."""
    if isinstance(visual, open_clip.transformer.VisionTransformer) and getattr(visual, "attn_pool", None) is None \
            and visual.proj is not None:
        width = int(visual.proj.shape[0])
        visual.proj = None
        return width, [visual.transformer], "ViT: transformer blocks + head"
    head = getattr(visual, "head", None)
    trunk = getattr(visual, "trunk", None)
    if isinstance(head, nn.Sequential) and "pool" not in dict(head.named_children()) and hasattr(trunk, "blocks"):
        return int(trunk.num_features), [trunk.blocks], "timm trunk: its blocks + head"
    return None


class CLIPImageClassifier(nn.Module):
    """A CLIP image tower with a linear head (see the module docstring for ``head``).

    Parameters
    ----------
    visual : nn.Module
        open_clip's ``model.visual``.
    embed_dim : int
        Width of the projected image embedding.
    num_classes : int
    head : {"linear", "zero_shot"}, default "linear"
        ``"linear"``: a fresh head on the pre-projection features, only the blocks and the head
        trainable (``requires_grad``), as the DEFT authors' phase 2. ``"zero_shot"``: a head on the
        projected embedding, the whole tower trainable.
    head_init : Tensor of shape (num_classes, embed_dim), optional
        ``"zero_shot"``: the head's weights (normalised class text embeddings), bias zero, so that before
        training ``logits = image_embedding @ text_embeddings.T`` — the zero-shot ranking.

    Attributes
    ----------
    trainable : str
        Which parameters train, in words (recorded in model.json).
    """

    def __init__(self, visual: nn.Module, embed_dim: int, num_classes: int, *, head: str = "linear",
                 head_init: torch.Tensor | None = None) -> None:
        super().__init__()
        check_param("CLIPImageClassifier", "head", head, head in CLIP_HEADS, f"one of {CLIP_HEADS}")
        self.visual = visual
        self.head_kind = head
        pre = _pre_projection(visual) if head == "linear" else None
        self._trunk_only = False
        if pre is None:
            self.head = nn.Linear(embed_dim, num_classes)
            self.trainable = "the whole tower + head (on the projected embedding)"
            if head == "linear":
                self.trainable += f"; {type(visual).__name__} has no known pre-projection features"
        else:
            width, blocks, self.trainable = pre
            self.head = nn.Linear(width, num_classes)
            self._trunk_only = not isinstance(visual, open_clip.transformer.VisionTransformer)
            for p in visual.parameters():
                p.requires_grad_(False)
            for module in blocks:
                for p in module.parameters():
                    p.requires_grad_(True)
        if head_init is not None and pre is None:
            with torch.no_grad():
                self.head.weight.copy_(head_init.to(self.head.weight))
                self.head.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads: pre-projection features (``"linear"``) or the projected embedding."""
        return self.visual.trunk(x) if self._trunk_only else self.visual(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_defaults(spec: ModelSpec) -> dict[str, Any]:
    """Optimiser defaults for the backbone ``spec``.

    Returns a copy of the matching :data:`TRAIN_DEFAULTS` entry (``"clip"`` for any open_clip image
    tower; for timm the exact ``ARCH.TAG`` first, then the architecture), else of
    :data:`FALLBACK_DEFAULTS`; ``"key"`` says which entry.
    """
    keys = ["clip"] if spec.family == "open_clip" else [spec.timm_name, spec.arch]
    for key in keys:
        if key in TRAIN_DEFAULTS:
            return {**TRAIN_DEFAULTS[key], "key": key}
    return {**FALLBACK_DEFAULTS, "key": "fallback"}


def _create_timm_classifier(spec: ModelSpec, *, num_classes: int,
                            image_size: int | None) -> tuple[nn.Module, DataConfig]:
    model = create_timm(spec, num_classes=num_classes, image_size=image_size)
    pretrained_classes = int(getattr(model, "pretrained_cfg", {}).get("num_classes", -1) or -1)
    if spec.weights != "none" and pretrained_classes != num_classes:
        _zero_head(model)  # the head was replaced, not loaded
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


def _create_clip_classifier(spec: ModelSpec, *, num_classes: int, classnames: Sequence[str] | None,
                            image_size: int | None, clip_config: dict[str, Any] | None,
                            clip_head: str) -> tuple[nn.Module, DataConfig]:
    folder = spec.local_dir
    head_init = None
    if clip_config is not None and folder is not None and not folder.exists():
        # an exported classifier whose CLIP folder has moved: rebuild the architecture from its config
        clip = open_clip_from_config(clip_config)
        pre = clip_config.get("preprocess_cfg", {})
        mean = tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(pre.get("std", open_clip.OPENAI_DATASET_STD))
        native = int(pre.get("size", clip_config["model_cfg"].get("vision_cfg", {}).get("image_size", 224)))
        embed_dim = int(clip_config["model_cfg"]["embed_dim"])
    else:
        clip, preprocess, tokenizer = load_open_clip(spec, "cpu")
        cfg = getattr(clip.visual, "preprocess_cfg", None) or {}
        mean = tuple(cfg.get("mean", getattr(clip.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN))
        std = tuple(cfg.get("std", getattr(clip.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD))
        size = getattr(clip.visual, "image_size", 224)
        native = int(size[0] if isinstance(size, (tuple, list)) else size)
        embed_dim = int(clip.text_projection.shape[-1])
        if classnames is not None and clip_head == "zero_shot":
            if len(classnames) != num_classes:
                raise ModelError(f"{len(classnames)} class names given for {num_classes} classes; give one name "
                                 "per class.")
            with torch.no_grad():
                tok = tokenizer([f"a photo of a {c}." for c in classnames])
                head_init = nn.functional.normalize(clip.encode_text(tok).float(), dim=-1)
    visual = clip.visual
    size = int(image_size if image_size is not None else native)
    if size != native and isinstance(visual, open_clip.transformer.VisionTransformer):
        raise ModelError(f"The CLIP image tower of {spec.name!r} is a ViT fixed at {native}px; it cannot train at "
                         f"--image-size {size}. Leave --image-size unset.")
    model = CLIPImageClassifier(visual, embed_dim, num_classes, head=clip_head, head_init=head_init)
    data = DataConfig(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),  # type: ignore[arg-type]
                      image_size=size, interpolation="bicubic", crop_pct=1.0)
    return model, data


def create_classifier(
    model: str | ModelSpec,
    *,
    num_classes: int,
    pretrained: str | None = None,
    classnames: Sequence[str] | None = None,
    image_size: int | None = None,
    clip_config: dict[str, Any] | None = None,
    clip_head: str = "linear",
) -> tuple[nn.Module, DataConfig]:
    """Build an image classifier and say how it wants its images.

    Parameters
    ----------
    model : str or ModelSpec
        Any name :func:`labelsieve.models.loader.parse_model` understands, or a parsed spec.
    num_classes : int
        Outputs of the new classification layer (>= 1).
    pretrained : str, optional
        Weights, as for every model (ignored when ``model`` is already a spec).
    classnames : sequence of str, optional
        CLIP towers with ``clip_head="zero_shot"``: initialise the head from the zero-shot text
        embeddings of ``"a photo of a {}."`` (one name per class).
    image_size : int, optional
        Train/evaluate at this size instead of the model's native one (timm ViTs have their
        position embeddings resampled; CNNs take any size; CLIP ViT towers refuse).
    clip_config : dict, optional
        ``open_clip_config.json`` contents used to rebuild a CLIP tower (random weights) when the local
        folder of ``model`` no longer exists (loading an exported classifier).
    clip_head : {"linear", "zero_shot"}, default "linear"
        CLIP towers: the head (see the module docstring); ignored for timm models.

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
    check_param(owner, "clip_head", clip_head, clip_head in CLIP_HEADS, f"one of {CLIP_HEADS}")
    spec = model if isinstance(model, ModelSpec) else parse_model(model, pretrained)
    if spec.family == "open_clip":
        return _create_clip_classifier(spec, num_classes=num_classes, classnames=classnames, image_size=image_size,
                                       clip_config=clip_config, clip_head=clip_head)
    return _create_timm_classifier(spec, num_classes=num_classes, image_size=image_size)

