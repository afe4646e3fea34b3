"""Image (and text) encoders for audits: an open_clip vision-language model or a timm backbone.

``create_encoder(model, pretrained=...)`` is the one way in; names and ``pretrained`` mean what
:mod:`labelsieve.models.loader` says (a local open_clip folder such as ``../shared/models/mini-clip``,
``ViT-B-16`` with its default ``openai`` weights or a local weight file, ``hf-hub:org/repo``, or a timm
model — image features only, so text-based detectors refuse it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import open_clip
import timm
import torch

from labelsieve.core.defaults import DEFAULT_MODEL
from labelsieve.core.errors import ModelError
from labelsieve.core.runtime import resolve_device
from labelsieve.models.loader import ModelSpec, create_timm, load_open_clip, parse_model, weights_identity


@dataclass
class Encoder:
    """A loaded model that turns images (and, for CLIP models, text) into embeddings.

    Attributes
    ----------
    kind : {"open_clip", "timm"}
    name : str
        Architecture name (or local folder) as given.
    pretrained : str or None
        Weight tag or file as given.
    model : torch.nn.Module
        The open_clip ``CLIP`` model or the timm model (``num_classes=0``).
    preprocess : callable
        PIL image -> float tensor (C, H, W), the model's evaluation transform.
    tokenizer : callable or None
        open_clip tokenizer (``None`` for image-only models).
    mean, std : tuple of float
        Normalisation used by ``preprocess``.
    image_size : int
    embed_dim : int
    device : torch.device
    identity : dict
        What determines the embeddings (architecture, weights identity, preprocessing); its hash is
        the feature-cache key.
    spec : ModelSpec
        The parsed name it was loaded from.
    """

    kind: str
    name: str
    pretrained: str | None
    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    embed_dim: int
    device: torch.device
    identity: dict[str, Any] = field(default_factory=dict)
    spec: ModelSpec | None = None

    @property
    def has_text(self) -> bool:
        return self.kind == "open_clip"

    @property
    def key(self) -> str:
        """Feature-cache key: hash of :attr:`identity`."""
        blob = json.dumps(self.identity, sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=10).hexdigest()

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature ``exp(logit_scale)`` (100 for OpenAI CLIP); 100 for image-only models."""
        ls = getattr(self.model, "logit_scale", None)
        return float(ls.detach().exp().item()) if ls is not None else 100.0

    def describe(self) -> dict[str, Any]:
        """What audit.json records about the model."""
        return {"kind": self.kind, "name": self.name, "pretrained": self.pretrained,
                "embed_dim": self.embed_dim, "image_size": self.image_size, "cache_key": self.key,
                "extraction": {"memory_format": "channels_last",
                               "precision": "float16 autocast" if self.device.type == "cuda" else "float32"},
                "spec": self.spec.to_dict() if self.spec is not None else None}

    def require_text(self, who: str) -> None:
        if not self.has_text:
            raise ModelError(
                f"{who} needs a vision-language model with a text tower, but {self.name!r} is an image-only "
                "timm model. Use a CLIP model (--model ViT-B-16 --pretrained openai, or a local open_clip "
                "folder), or an image-feature detector (knn, confident_learning)."
            )

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of a preprocessed batch (B, 3, H, W) -> (B, D) float32, not normalised.

        The batch goes in as ``channels_last`` (the tower's weights are stored so, see :func:`create_encoder`);
        on CUDA under float16 autocast, on a CPU in float32 (bfloat16 is not used: see
        docs/architecture.md, "Extraction speed")."""
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        use_amp = self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=use_amp):
            out = self.model.encode_image(x) if self.kind == "open_clip" else self.model(x)
        return out.float()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings (T, D) float32."""
        self.require_text("Text encoding")
        assert self.tokenizer is not None
        outs = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            e = self.model.encode_text(tok).float()
            outs.append(torch.nn.functional.normalize(e, dim=-1))
        return torch.cat(outs)

    def class_text_embeddings(self, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """Zero-shot classifier: per class, the normalised mean of the normalised template embeddings.
        Returns float32 (C, D)."""
        rows = []
        for name in classnames:
            e = self.encode_text([t.format(name) for t in templates]).mean(0)
            rows.append(torch.nn.functional.normalize(e, dim=0))
        return torch.stack(rows).cpu().numpy().astype(np.float32)


def _open_clip_encoder(spec: ModelSpec, device: torch.device) -> Encoder:
    model, preprocess, tokenizer = load_open_clip(spec, device)
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean", getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD))
    size = getattr(model.visual, "image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    proj = getattr(model, "text_projection", None)
    embed_dim = int(proj.shape[-1] if proj is not None and hasattr(proj, "shape")
                    else model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
    folder = spec.local_dir
    identity = {"kind": "open_clip", "weights": weights_identity(spec), "preprocess": repr(preprocess),
                "arch": (folder / "open_clip_config.json").read_text() if folder is not None else spec.arch}
    return Encoder(kind="open_clip", name=spec.name, pretrained=spec.tag or spec.file, model=model,
                   preprocess=preprocess, tokenizer=tokenizer, mean=mean, std=std, image_size=size,
                   embed_dim=embed_dim, device=device, identity=identity, spec=spec)


def _timm_encoder(spec: ModelSpec, device: torch.device) -> Encoder:
    model = create_timm(spec, num_classes=0)
    model.eval().to(device)
    cfg = timm.data.resolve_model_data_config(model)
    preprocess = timm.data.create_transform(**cfg, is_training=False)
    identity = {"kind": "timm", "arch": spec.timm_name, "weights": weights_identity(spec),
                "preprocess": repr(preprocess)}
    return Encoder(kind="timm", name=spec.timm_name, pretrained=spec.tag or spec.file, model=model,
                   preprocess=preprocess, tokenizer=None, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                   image_size=int(cfg["input_size"][-1]), embed_dim=int(model.num_features), device=device,
                   identity=identity, spec=spec)


def create_encoder(
    model: str | ModelSpec = DEFAULT_MODEL,
    *,
    pretrained: str | None = None,
    device: str | torch.device | None = None,
) -> Encoder:
    """Load an encoder by name or path (see :mod:`labelsieve.models.loader` for names and ``pretrained``)."""
    dev = resolve_device(device)
    spec = model if isinstance(model, ModelSpec) else parse_model(model, pretrained)
    enc = _open_clip_encoder(spec, dev) if spec.family == "open_clip" else _timm_encoder(spec, dev)
    # channels_last image tower: convolutions run 1.5x faster in it on a CPU (mini CLIP's EfficientNet: 14.9 ->
    # 22.3 img/s on 2 threads, benchmarks/extraction.py) and it is PyTorch's advice for CNNs on GPUs; a ViT only
    # has its patch embedding in 4-D, unchanged in speed. Embeddings agree to a cosine of 1 - 1e-7, below the
    # store's float16 precision, so the feature-cache key does not change.
    (enc.model.visual if enc.kind == "open_clip" else enc.model).to(memory_format=torch.channels_last)
    return enc
