"""Image (and text) encoders built by name: open_clip vision-language models and timm backbones.

``create_encoder(model, pretrained=...)`` is the one way in:

* a local open_clip model folder (``open_clip_config.json`` + weights), e.g. ``../shared/models/mini-clip``;
* an open_clip architecture name (``ViT-B-16``) with a ``pretrained`` tag (``openai``, downloaded by
  open_clip as usual) or a local weight file;
* ``hf-hub:org/repo`` for open_clip hub models;
* a timm model name (optionally ``timm:NAME``) with an optional local weight file — image features
  only, so text-based detectors refuse it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labelsieve.errors import ModelError
from labelsieve.runtime import resolve_device

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"


def file_identity(path: str | os.PathLike[str]) -> str:
    """A cheap, content-sensitive identity of a (possibly large) weight file: size + hash of its first
    and last MiB."""
    p = Path(path)
    st = p.stat()
    h = hashlib.blake2b(digest_size=12)
    h.update(str(st.st_size).encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > (2 << 20):
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()


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
                "embed_dim": self.embed_dim, "image_size": self.image_size, "cache_key": self.key}

    def require_text(self, who: str) -> None:
        if not self.has_text:
            raise ModelError(
                f"{who} needs a vision-language model with a text tower, but {self.name!r} is an image-only "
                "timm model. Use a CLIP model (--model ViT-B-16 --pretrained openai, or a local open_clip "
                "folder), or an image-feature detector (knn, confident_learning)."
            )

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of a preprocessed batch (B, 3, H, W) -> (B, D) float32, not normalised."""
        x = x.to(self.device, non_blocking=True)
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


def _transform_signature(preprocess: Any) -> str:
    return repr(preprocess)


def _is_local_open_clip_dir(p: Path) -> bool:
    return p.is_dir() and (p / "open_clip_config.json").is_file()


def _load_open_clip(name: str, pretrained: str | None, device: torch.device) -> Encoder:
    import open_clip

    local = Path(name).expanduser()
    identity: dict[str, Any] = {"kind": "open_clip"}
    if _is_local_open_clip_dir(local):
        local = local.resolve()
        spec = "local-dir:" + str(local)
        weights = sorted(p for p in local.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        identity.update(arch=(local / "open_clip_config.json").read_text(),
                        weights=[file_identity(w) for w in weights])
        kwargs: dict[str, Any] = {}
        if pretrained:
            raise ModelError(f"--pretrained cannot be combined with the model folder {local}: the folder "
                             "holds its own weights.")
    else:
        spec = name
        kwargs = {}
        if pretrained:
            pp = Path(pretrained).expanduser()
            if pp.is_file():
                kwargs["pretrained"] = str(pp.resolve())
                identity["weights"] = file_identity(pp)
            elif pp.suffix in (".safetensors", ".bin", ".pt", ".pth") or os.sep in pretrained:
                raise ModelError(f"Weight file not found: {pretrained}. Give an existing file, or a pretrained "
                                 f"tag such as 'openai' (see open_clip.list_pretrained()).")
            else:
                kwargs["pretrained"] = pretrained
                identity["weights"] = pretrained
        identity["arch"] = name
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(spec, device=device, **kwargs)
        tokenizer = open_clip.get_tokenizer(spec)
    except Exception as exc:
        hint = ""
        if any(w in str(exc).lower() for w in ("download", "connect", "offline", "hub")):
            hint = (" The weights could not be fetched (offline?). Download them once where the network "
                    "is reachable and pass the file with --pretrained PATH, or use a local open_clip model "
                    "folder with --model DIR.")
        raise ModelError(f"Cannot load open_clip model {name!r} (pretrained={pretrained!r}): {exc}.{hint}") from exc
    model.eval()
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean", getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD))
    size = getattr(model.visual, "image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    embed_dim = int(model.text_projection.shape[-1] if hasattr(model, "text_projection")
                    and model.text_projection is not None and hasattr(model.text_projection, "shape")
                    else model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
    identity["preprocess"] = _transform_signature(preprocess)
    return Encoder(kind="open_clip", name=name, pretrained=pretrained, model=model, preprocess=preprocess,
                   tokenizer=tokenizer, mean=mean, std=std, image_size=size, embed_dim=embed_dim,
                   device=device, identity=identity)


def _load_timm(name: str, pretrained: str | None, device: torch.device) -> Encoder:
    import timm

    identity: dict[str, Any] = {"kind": "timm", "arch": name}
    kwargs: dict[str, Any] = {"num_classes": 0}
    if pretrained and pretrained.lower() != "none":
        pp = Path(pretrained).expanduser()
        if pp.is_file():
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pp.resolve())})
            identity["weights"] = file_identity(pp)
        else:
            if pp.suffix in (".safetensors", ".bin", ".pt", ".pth") or os.sep in pretrained:
                raise ModelError(f"Weight file not found: {pretrained}. Give an existing weight file for {name}.")
            name = f"{name}.{pretrained}" if "." not in name else name
            kwargs["pretrained"] = True
            identity["weights"] = pretrained
    elif pretrained is None:
        kwargs["pretrained"] = True
        identity["weights"] = "timm-default"
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as exc:
        raise ModelError(f"Cannot load timm model {name!r}: {exc}. Pass a local weight file with "
                         "--pretrained PATH when offline.") from exc
    model.eval().to(device)
    cfg = timm.data.resolve_model_data_config(model)
    preprocess = timm.data.create_transform(**cfg, is_training=False)
    identity["preprocess"] = _transform_signature(preprocess)
    size = cfg["input_size"][-1]
    return Encoder(kind="timm", name=name, pretrained=pretrained, model=model, preprocess=preprocess,
                   tokenizer=None, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), image_size=int(size),
                   embed_dim=int(model.num_features), device=device, identity=identity)


def create_encoder(
    model: str = DEFAULT_MODEL,
    *,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str | torch.device | None = None,
) -> Encoder:
    """Load an encoder by name or path (see the module docstring)."""
    dev = resolve_device(device)
    p = Path(model).expanduser()
    if p.exists():
        if _is_local_open_clip_dir(p):
            return _load_open_clip(str(p), None if pretrained == DEFAULT_PRETRAINED else pretrained, dev)
        raise ModelError(f"{p} is not an open_clip model folder (no open_clip_config.json). Give a model name "
                         "with --model and the weight file with --pretrained PATH.")
    if model.startswith("timm:"):
        return _load_timm(model[5:], None if pretrained == DEFAULT_PRETRAINED else pretrained, dev)
    if model.startswith(("hf-hub:", "local-dir:")):
        return _load_open_clip(model, pretrained, dev)
    import open_clip

    clip_names = open_clip.list_models()
    if model in clip_names:
        return _load_open_clip(model, pretrained, dev)
    import timm

    if timm.is_model(model) or timm.is_model(model.split(".")[0]):
        return _load_timm(model, None if pretrained == DEFAULT_PRETRAINED else pretrained, dev)
    close = difflib.get_close_matches(model, clip_names + timm.list_models(), n=5, cutoff=0.6)
    raise ModelError(f"Unknown model {model!r}: not a local model folder, an open_clip architecture or a timm "
                     f"model.{' Did you mean: ' + ', '.join(close) + '?' if close else ''}")
