"""An exported classifier on disk: ``model.safetensors`` + ``model.json``, written and read back.

:func:`export_classifier` writes both files atomically; :func:`load_classifier` rebuilds the
architecture named in ``model.json`` with random weights (no download) and loads the weights. A CLIP
tower whose local model folder has moved since training is rebuilt from the ``open_clip_config.json``
kept in ``model.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from labelsieve.core.errors import ModelError
from labelsieve.core.io import atomic_path, write_json
from labelsieve.core.runtime import resolve_device
from labelsieve.models.classifiers import create_classifier
from labelsieve.models.loader import ModelSpec

__all__ = ["MODEL_FORMAT", "MODEL_FORMAT_VERSION", "export_classifier", "load_classifier"]

MODEL_FORMAT = "labelsieve-classifier"
MODEL_FORMAT_VERSION = 2
_MAX_LISTED = 5


def export_classifier(model: torch.nn.Module, out_dir: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``out_dir`` (each by atomic replace).

    Parameters
    ----------
    model : nn.Module
    out_dir : path
    meta : dict
        JSON-serialisable description: ``spec`` (the backbone's :class:`ModelSpec` as a dict),
        ``num_classes``, ``classes``, ``preprocessing`` and, for CLIP towers, ``clip_config``.

    Returns
    -------
    Path
        The folder.
    """
    out = Path(out_dir)
    with atomic_path(out / "model.safetensors") as tmp:
        save_model(model.to("cpu"), str(tmp), metadata={"format": MODEL_FORMAT})
    write_json(meta, out / "model.json")
    return out


def _spec_of(meta: dict[str, Any]) -> ModelSpec:
    """The backbone of an export, with random weights (version 2 records it; version 1 named it)."""
    if "spec" in meta:
        return ModelSpec(**{**meta["spec"], "weights": "none", "tag": None, "file": None})
    arch = meta["architecture"]
    if arch == "clip":  # version 1: the CLIP tower was named by its folder
        folder = str(meta.get("clip_model") or "")
        return ModelSpec("open_clip", folder, "local-dir:" + folder, "none")
    name, _, _ = str(arch).partition(".")
    return ModelSpec("timm", arch, name, "none")


def load_classifier(model_dir: str | os.PathLike[str], *,
                    device: str | torch.device | None = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild an exported classifier.

    Parameters
    ----------
    model_dir : path
        Folder with ``model.json`` and ``model.safetensors`` (as written by ``labelsieve train``).
    device : str or torch.device, optional
        Where to put the model (default CPU; ``None``: CUDA if available).

    Returns
    -------
    model : nn.Module
        In eval mode.
    meta : dict
        The contents of ``model.json``.

    Raises
    ------
    ModelError
        If the folder is not an exported classifier, or the weights do not fit the architecture.
    """
    d = Path(model_dir).expanduser()
    meta_path, weights = d / "model.json", d / "model.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise ModelError(f"{d} is not an exported labelsieve model (it needs model.json and model.safetensors). "
                         "Give the folder written by 'labelsieve train -o DIR'.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        spec = _spec_of(meta)
        n_classes = int(meta["num_classes"])
        size = int(meta["preprocessing"]["image_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{meta_path}: not a labelsieve model description ({exc}). Re-export the model with "
                         "'labelsieve train'.") from exc
    # exports made before the "linear" CLIP head existed put their head on the projected embedding
    clip_head = (meta.get("training") or {}).get("clip_head", "zero_shot")
    model, _ = create_classifier(spec, num_classes=n_classes, image_size=size, clip_config=meta.get("clip_config"),
                                 clip_head=clip_head)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device="cpu")
    except Exception as exc:
        raise ModelError(f"{weights}: cannot load the weights into {spec.name} ({exc}). The file may be damaged; "
                         "re-export the model.") from exc
    if missing or unexpected:
        raise ModelError(f"{weights}: the weights do not fit {spec.name} (missing {sorted(missing)[:_MAX_LISTED]}, "
                         f"unexpected {sorted(unexpected)[:_MAX_LISTED]}). Check that model.json and "
                         "model.safetensors come from the same export.")
    model.eval()
    return model.to(resolve_device(device)), meta
