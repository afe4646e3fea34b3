"""labelsieve: find wrong labels in image classification datasets.

The Python API mirrors the CLI::

    import labelsieve
    audit = labelsieve.audit("images/", "labels.csv", out_dir="audit/")   # the default ensemble

``import labelsieve`` stays light: the names below are imported from their modules on first use
(PEP 562), because those modules import torch, open_clip and timm (seconds; docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import Any

from labelsieve.core.errors import DataError, LabelsieveError, ModelError, ParameterError

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_LAZY = {
    "audit": "labelsieve.api",
    "detect": "labelsieve.api",
    "audit_features": "labelsieve.api",
    "audit_pred_probs": "labelsieve.api",
    "apply_review": "labelsieve.api",
    "evaluate_audit": "labelsieve.api",
    "predict": "labelsieve.api",
    "train_from_audit": "labelsieve.api",
    "create_detector": "labelsieve.detectors",
    "list_detectors": "labelsieve.detectors",
    "load_images": "labelsieve.data",
}

__all__ = ["DataError", "LabelsieveError", "ModelError", "ParameterError", "__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'labelsieve' has no attribute {name!r}")
