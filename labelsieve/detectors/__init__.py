"""Detector registry: ``create_detector(name, **params)`` and ``list_detectors()``.

Detector modules register their class with :func:`register_detector`. The modules are imported
lazily on first use so that ``import labelsieve`` stays light.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import inspect
from typing import Any

from labelsieve.detectors.base import DetectionContext, DetectionResult, Detector
from labelsieve.errors import ParameterError

__all__ = [
    "DEFAULT_METHOD",
    "DetectionContext",
    "DetectionResult",
    "Detector",
    "create_detector",
    "get_detector_class",
    "list_detectors",
    "register_detector",
]

#: What ``labelsieve audit`` runs without ``--method``: the detector the benchmark measured best (highest
#: mean F1 and AUROC over six noisy datasets with the mini CLIP; docs/benchmarks.md): the ensemble of
#: co-divide, TURN's probe (no fine-tuning) and kNN, stacked.
DEFAULT_METHOD = "ensemble"

# name -> module that defines (and registers) it; filled as modules land.
_MODULES: dict[str, str] = {
    "label_match": "labelsieve.detectors.label_match",
    "knn": "labelsieve.detectors.knn",
    "confident_learning": "labelsieve.detectors.confident_learning",
    "deft": "labelsieve.detectors.deft",
    "turn": "labelsieve.detectors.turn",
    "codivide": "labelsieve.detectors.codivide",
    "small_loss": "labelsieve.detectors.small_loss",
    "gmm": "labelsieve.detectors.gmm",
    "ensemble": "labelsieve.detectors.ensemble",
}
_REGISTRY: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    """Class decorator adding a detector to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no 'name'")
    _REGISTRY[cls.name] = cls
    return cls


def _available() -> list[str]:
    names = [name for name, module in _MODULES.items() if importlib.util.find_spec(module) is not None]
    return sorted(set(names) | set(_REGISTRY))


def get_detector_class(name: str) -> type[Detector]:
    """The detector class registered as ``name``."""
    if name not in _REGISTRY and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _REGISTRY:
        raise ParameterError(
            f"Unknown detector {name!r}. Choose one of: {', '.join(list_detectors())} "
            "(or a comma-separated list of them for an ensemble)."
        )
    return _REGISTRY[name]


def create_detector(name: str, **params: Any) -> Detector:
    """Build a detector by name. A comma-separated list builds an ensemble of those detectors."""
    if "," in name:
        members = [n.strip() for n in name.split(",") if n.strip()]
        cls = get_detector_class("ensemble")
        _check_params(cls, "ensemble", params)
        return cls(members=members, **params)
    cls = get_detector_class(name)
    _check_params(cls, name, params)
    return cls(**params)


def _check_params(cls: type[Detector], name: str, params: dict[str, Any]) -> None:
    """Unknown parameter names raise a ParameterError that lists the detector's parameters."""
    sig = inspect.signature(cls.__init__)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    known = [p for p in sig.parameters if p != "self"]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ParameterError(f"The {name!r} detector has no parameter {', '.join(map(repr, unknown))}. Its "
                             f"parameters are: {', '.join(known) or 'none'}. Leave out the option or choose a "
                             "detector that takes it ('labelsieve detectors' lists them).")


def list_detectors(pattern: str = "*") -> list[str]:
    """Registered detector names matching the fnmatch ``pattern``."""
    return [n for n in _available() if fnmatch.fnmatch(n, pattern)]
