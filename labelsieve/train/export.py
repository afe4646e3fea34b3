"""An exported classifier on disk: ``model.safetensors`` + ``model.json``, written and read back.

:func:`export_classifier` writes both files atomically; :func:`load_classifier` rebuilds the
architecture named in ``model.json`` with random weights (no download) and loads the weights. A CLIP
tower whose local model folder has moved since training is rebuilt from the ``open_clip_config.json``
kept in ``model.json``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from labelsieve.core.errors import ModelError
from labelsieve.core.fileset import recover, replace_files
from labelsieve.core.io import atomic_path, write_json
from labelsieve.core.runtime import resolve_device
from labelsieve.models.classifiers import create_classifier
from labelsieve.models.loader import ModelSpec

__all__ = ["MODEL_FILES", "MODEL_FORMAT", "MODEL_FORMAT_VERSION", "export_classifier", "load_classifier"]

MODEL_FORMAT = "labelsieve-classifier"
MODEL_FORMAT_VERSION = 2
#: The files of an export, replaced together (journal ``.model.replace.json``).
MODEL_FILES = ("model.safetensors", "model.json")
MODEL_TAG = "model"
_MAX_LISTED = 5


def export_classifier(model: torch.nn.Module, out_dir: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``out_dir`` as one unit.

    Both carry the export's ``model_id`` (the weights in their safetensors metadata) and replace an earlier
    export together (:func:`labelsieve.core.fileset.replace_files`): an interruption leaves the earlier model or
    this one, never this one's weights with the earlier one's classes.

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
    model_id = "md-" + secrets.token_hex(6)
    meta = {**meta, "model_id": model_id}

    def weights(path: Path) -> None:
        with atomic_path(path) as tmp:
            save_model(model.to("cpu"), str(tmp), metadata={"format": MODEL_FORMAT, "model_id": model_id})

    replace_files(out, {"model.safetensors": weights, "model.json": lambda p: write_json(meta, p)}, tag=MODEL_TAG,
                  members=MODEL_FILES, record={"model_id": model_id})
    return out


def _check_same_export(meta: dict[str, Any], weights: Path) -> None:
    """Refuse weights and a description from two different exports (their ``model_id`` differs)."""
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            stored = (f.metadata() or {}).get("model_id")
    except Exception as exc:  # safetensors raises its own error type for anything that is not its format
        raise ModelError(f"{weights}: not a safetensors file ({type(exc).__name__}: {exc}). The file may be damaged; "
                         "re-export the model with 'labelsieve train'.") from exc
    recorded = meta.get("model_id")
    if recorded is not None and stored != recorded:
        raise ModelError(f"{weights.parent}: model.safetensors (export {stored}) and model.json (export {recorded}) "
                         "come from two different trainings; the model cannot be used. Train again into this "
                         "folder, or restore both files of one export.")


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
    if d.is_dir():
        recover(d, MODEL_TAG)  # an export interrupted after its commit point: finish it
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
    _check_same_export(meta, weights)
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
