"""The detector registry: ``create_detector(name, **params)``, ``list_detectors()``, ``@register_detector``.

A detector is added by writing one module in :mod:`labelsieve.detectors` whose class carries the
``@register_detector`` decorator: the registry finds it by importing every module of the package the
first time a name is looked up or listed (modules are imported on first use, so ``import labelsieve``
stays light). The decorator checks the class and refuses a second class under a name already taken.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import pkgutil
from typing import Any

from labelsieve.core.errors import ParameterError
from labelsieve.detectors.common.base import Detector

__all__ = ["create_detector", "get_detector_class", "list_detectors", "register_detector"]

_PACKAGE = "labelsieve.detectors"
#: Modules of the package that hold no detector.
_NOT_DETECTORS = frozenset({"registry", "common"})
_REGISTRY: dict[str, type[Detector]] = {}
_discovered = False


def register_detector(cls: type[Detector]) -> type[Detector]:
    """Class decorator adding a detector to the registry under ``cls.name``.

    Raises
    ------
    TypeError
        If ``cls`` is not a concrete :class:`~labelsieve.detectors.common.base.Detector` subclass with a
        ``name`` (a lowercase identifier) and a one-line ``summary``, or another class is already
        registered under its name.
    """
    if not (inspect.isclass(cls) and issubclass(cls, Detector)):
        raise TypeError(f"@register_detector decorates Detector subclasses; got {cls!r}")
    if inspect.isabstract(cls):
        raise TypeError(f"{cls.__name__} does not implement detect(); it cannot be registered")
    name = cls.name
    if not (isinstance(name, str) and name.isidentifier() and name == name.lower()):
        raise TypeError(f"{cls.__name__}.name must be a lowercase identifier; got {name!r}")
    if not (isinstance(cls.summary, str) and cls.summary.strip()):
        raise TypeError(f"{cls.__name__} needs a one-line 'summary' for `labelsieve detectors`")
    other = _REGISTRY.get(name)
    if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"detector name {name!r} is taken by {other.__module__}.{other.__qualname__}; "
                        f"choose another name for {cls.__module__}.{cls.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    """Import every detector module of the package once (their decorators fill the registry)."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_DETECTORS and not info.name.startswith("_"):
            importlib.import_module(f"{_PACKAGE}.{info.name}")
    _discovered = True


def get_detector_class(name: str) -> type[Detector]:
    """The detector class registered as ``name``."""
    _discover()
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
    """Registered detector names matching the fnmatch ``pattern``, sorted."""
    _discover()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
