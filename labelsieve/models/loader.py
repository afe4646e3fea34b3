"""The one model loader: a model named by the user, parsed once, loaded through open_clip or timm.

:func:`parse_model` turns what a user types (``--model`` of ``audit``, ``--backbone`` of ``train``)
into a :class:`ModelSpec`; :func:`load_open_clip` and :func:`create_timm` load it. The encoders used
by audits (:mod:`labelsieve.models.encoders`) and the classifiers trained by ``labelsieve train``
(:mod:`labelsieve.models.classifiers`) both go through here, so a name means the same thing in both.

Names, tried in this order:

=====================================  ===================================================
``NAME``                               is
=====================================  ===================================================
an existing folder                     a local open_clip model (``open_clip_config.json`` + weights)
``hf-hub:ORG/REPO``, ``local-dir:DIR``  open_clip's own schemas
``timm:NAME``                          a timm model, whatever open_clip has of that name
an alias (:data:`MODEL_ALIASES`)       the timm model it stands for (``lite0``, ``convnext_t`` …)
an open_clip architecture              ``ViT-B-16``, ``RN50`` … (``open_clip.list_models()``)
a timm name, optionally ``NAME.TAG``   ``convnext_tiny``, ``resnet50.a1_in1k`` …
=====================================  ===================================================

``pretrained`` has one meaning for every model:

* ``None`` or ``"default"`` — the model's default weights: a local folder's own file; for an open_clip
  architecture the tag in :data:`~labelsieve.core.defaults.DEFAULT_PRETRAINED_TAGS` (``openai`` for
  ViT-B-16), else the first tag open_clip lists; for timm the tag in the name, else timm's default.
  open_clip and timm download what they need as usual (offline, pass a file).
* ``"none"`` — random initialisation (e.g. before loading an exported classifier).
* a path to an existing file — weights from that file, offline.
* anything else — a weight tag (open_clip's ``pretrained``, timm's ``NAME.TAG``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from torch import nn

from labelsieve.core.defaults import DEFAULT_PRETRAINED_TAGS
from labelsieve.core.errors import ModelError

__all__ = ["MODEL_ALIASES", "WEIGHT_SUFFIXES", "ModelSpec", "create_timm", "file_identity", "load_open_clip",
           "open_clip_from_config", "parse_model", "weights_identity"]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz", ".ckpt")

#: Short names -> timm model names (with the pretrained tag DEFT's code uses where it names one).
MODEL_ALIASES: dict[str, str] = {
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


@dataclass(frozen=True)
class ModelSpec:
    """A model as named by a user, parsed once (see the module docstring).

    Attributes
    ----------
    family : {"open_clip", "timm"}
    name : str
        What the user gave (for messages and records).
    arch : str
        open_clip: the name passed to open_clip (an architecture, ``hf-hub:…`` or ``local-dir:<abs path>``);
        timm: the architecture without a tag.
    weights : {"none", "file", "tag", "folder", "hub", "default"}
        Where the weights come from: random init, a local file, a weight tag, a local model folder's own
        file, the Hugging Face hub repository, or (timm only) timm's default tag.
    tag : str or None
        The weight tag (``weights == "tag"``).
    file : str or None
        Absolute path of the weight file (``weights == "file"``).
    """

    family: str
    name: str
    arch: str
    weights: str
    tag: str | None = None
    file: str | None = None

    @property
    def local_dir(self) -> Path | None:
        """The local open_clip model folder, for ``local-dir:`` specs."""
        return Path(self.arch[len("local-dir:"):]) if self.arch.startswith("local-dir:") else None

    @property
    def has_text(self) -> bool:
        """True for vision-language (open_clip) models."""
        return self.family == "open_clip"

    @property
    def timm_name(self) -> str:
        """timm's ``ARCH.TAG`` (or ``ARCH``) for this spec."""
        return f"{self.arch}.{self.tag}" if self.tag else self.arch

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (recorded in audit.json and model.json)."""
        return asdict(self)


def _looks_like_path(value: str) -> bool:
    return value.lower().endswith(WEIGHT_SUFFIXES) or os.sep in value or "/" in value or value.startswith("~")


def _is_open_clip_dir(p: Path) -> bool:
    return p.is_dir() and (p / "open_clip_config.json").is_file()


def _weights(family: str, name: str, pretrained: str | None, name_tag: str | None) -> tuple[str, str | None,
                                                                                           str | None]:
    """(weights, tag, file) for ``pretrained`` (see the module docstring)."""
    given = None if pretrained is None else str(pretrained).strip()
    if given is None or given.lower() == "default":
        return ("tag", name_tag, None) if name_tag else ("default", None, None)
    if given.lower() == "none":
        return "none", None, None
    p = Path(given).expanduser()
    if p.is_file():
        return "file", None, str(p.resolve())
    if _looks_like_path(given):
        raise ModelError(f"Weight file not found: {given}. Pass --pretrained with the path of an existing weight file "
                         f"for {name}, a weight tag, or 'none' for random initialisation.")
    return "tag", given, None


def parse_model(name: str, pretrained: str | os.PathLike[str] | None = None) -> ModelSpec:
    """Parse a model name and its ``pretrained`` value (see the module docstring).

    Raises
    ------
    ModelError
        Unknown name (with close matches), a folder that is not an open_clip model, a missing weight
        file, or weights given for a folder that holds its own.
    """
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ModelError(f"A model name is needed (an open_clip architecture, a local open_clip folder or a timm "
                         f"model); got {name!r}.")
    name = str(name).strip()
    pre = None if pretrained is None else str(pretrained)
    local = Path(name).expanduser()
    if name.startswith("local-dir:") or local.exists():
        folder = Path(name[len("local-dir:"):]).expanduser() if name.startswith("local-dir:") else local
        if not _is_open_clip_dir(folder):
            raise ModelError(f"{folder} is not an open_clip model folder (no open_clip_config.json). Give a model "
                             "name, and a weight file with --pretrained PATH.")
        weights, _, _ = _weights("open_clip", name, pre, None)
        if weights not in ("default", "none"):
            raise ModelError(f"--pretrained cannot be combined with the model folder {folder}: the folder holds "
                             "its own weights (use 'none' only for random initialisation).")
        return ModelSpec("open_clip", name, "local-dir:" + str(folder.resolve()),
                         "none" if weights == "none" else "folder")
    if name.startswith("hf-hub:"):
        weights, _, _ = _weights("open_clip", name, pre, None)
        return ModelSpec("open_clip", name, name, "none" if weights == "none" else "hub")
    timm_name = name[len("timm:"):] if name.startswith("timm:") else MODEL_ALIASES.get(name.lower())
    if timm_name is None and name in open_clip.list_models():
        weights, tag, file = _weights("open_clip", name, pre, None)
        if weights == "default":
            tags = open_clip.list_pretrained_tags_by_model(name)
            tag = DEFAULT_PRETRAINED_TAGS.get(name) or (tags[0] if tags else None)
            if tag is None:
                raise ModelError(f"open_clip has no pretrained weights for {name!r}. Pass a weight file with "
                                 "--pretrained PATH, or 'none' for random initialisation.")
            weights = "tag"
        return ModelSpec("open_clip", name, name, weights, tag, file)
    full = timm_name or name
    arch, _, name_tag = full.partition(".")
    if timm.is_model(arch):
        weights, tag, file = _weights("timm", name, pre, name_tag or None)
        return ModelSpec("timm", name, arch, weights, tag, file)
    close = difflib.get_close_matches(name, list(MODEL_ALIASES) + open_clip.list_models() + timm.list_models(),
                                      n=5, cutoff=0.6)
    raise ModelError(f"Unknown model {name!r}: not a local open_clip folder, an open_clip architecture, an alias "
                     f"({', '.join(sorted(MODEL_ALIASES))}) or a timm model."
                     + (f" Did you mean: {', '.join(close)}?" if close else "")
                     + " open_clip.list_models() and timm.list_models('*pattern*') list the names.")


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


def weights_identity(spec: ModelSpec) -> Any:
    """What identifies the weights of ``spec`` (part of the feature-cache key)."""
    if spec.weights == "folder":
        folder = spec.local_dir
        assert folder is not None
        return [file_identity(w) for w in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)]
    if spec.weights == "file":
        assert spec.file is not None
        return file_identity(spec.file)
    if spec.weights == "default" and spec.family == "timm":
        return "timm-default"
    return spec.tag or spec.weights


def _offline_hint(exc: BaseException) -> str:
    text = str(exc).lower()
    if any(w in text for w in ("download", "connect", "offline", "hub", "resolve", "internet")) or os.environ.get(
            "HF_HUB_OFFLINE"):
        return (" The weights could not be fetched (offline?). Download them once where the network is reachable "
                "and pass the file with --pretrained PATH, use a local open_clip model folder, or --pretrained none "
                "for random initialisation.")
    return ""


def load_open_clip(spec: ModelSpec, device: torch.device | str = "cpu") -> tuple[nn.Module, Any, Any]:
    """(model in eval mode on ``device``, evaluation preprocess, tokenizer) of an open_clip spec.

    Raises
    ------
    ModelError
        If open_clip cannot build or fetch it (the message says how to load it offline).
    """
    kwargs: dict[str, Any] = {}
    if spec.weights == "file":
        kwargs["pretrained"] = spec.file
    elif spec.weights == "tag":
        kwargs["pretrained"] = spec.tag
    elif spec.weights == "none":
        kwargs["load_weights"] = False
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, device=device, **kwargs)
        tokenizer = open_clip.get_tokenizer(spec.arch)
    except Exception as exc:
        raise ModelError(f"Cannot load open_clip model {spec.name!r} (weights: {spec.tag or spec.file or spec.weights})"
                         f": {type(exc).__name__}: {exc}.{_offline_hint(exc)}") from exc
    model.eval()
    return model, preprocess, tokenizer


def open_clip_from_config(config: dict[str, Any]) -> nn.Module:
    """An open_clip model built, randomly initialised and offline, from the contents of an
    ``open_clip_config.json`` (kept in an exported classifier's model.json)."""
    blob = json.dumps(config["model_cfg"], sort_keys=True)
    name = "labelsieve-clip-" + hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()
    if name not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.json"
            path.write_text(blob)
            open_clip.add_model_config(path)
    return open_clip.create_model(name, pretrained=None)


def create_timm(spec: ModelSpec, *, num_classes: int, image_size: int | None = None) -> nn.Module:
    """The timm model of ``spec`` with ``num_classes`` outputs (0: the pooled features), on CPU.

    Raises
    ------
    ModelError
        If the architecture cannot be built, the weight file does not fit it, or a download fails.
    """
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    name = spec.arch
    what = "random initialisation"
    if spec.weights == "file":
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": spec.file})
        what = f"weight file {spec.file}"
    elif spec.weights in ("tag", "default"):
        name = spec.timm_name
        kwargs["pretrained"] = True
        what = f"pretrained weights {name!r} from the Hugging Face hub"
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as exc:
        if spec.weights == "file":
            raise ModelError(f"Cannot load {what} into timm model {spec.arch!r}: {exc}. Check that the file holds "
                             f"weights of {spec.arch} in timm's layout.") from exc
        if kwargs.get("pretrained"):
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise ModelError(f"Cannot get {what}{offline}: {type(exc).__name__}: {reason}. Download the weights "
                             "once where the network is reachable and pass the file with --pretrained PATH, "
                             "or use --pretrained none for random initialisation.") from exc
        raise ModelError(f"Cannot build timm model {name!r}: {exc}") from exc
    if image_size is not None and hasattr(model, "set_input_size"):
        try:
            model.set_input_size(img_size=image_size)
        except Exception as exc:
            raise ModelError(f"{spec.arch} cannot run at {image_size}px ({exc}). Choose another --image-size.") from exc
    return model
