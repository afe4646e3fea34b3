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
from labelsieve.core.methodspec import format_method, parse_method
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
    """Build a detector from a method string (:mod:`labelsieve.core.methodspec`) and keyword parameters.

    ``"knn"`` with ``k=20`` is one detector; ``"deft(logit_scale=calibrated)"`` one detector with a parameter
    written in place; ``"turn(finetune=false),knn"`` an ensemble whose members carry their own parameters, with
    ``params`` the ensemble's own (``combine``, ``weights``, ``clip``, ``trusted_weight``).

    Raises
    ------
    ParameterError
        For an unknown detector or parameter (listing the known ones), a parameter given both in the string and
        as a keyword, or a member's parameter given to an ensemble as a keyword (the message shows the method
        string that sets it on the member).
    """
    members = parse_method(name)
    if len(members) == 1:
        member, inline = members[0]
        both = sorted(set(inline) & set(params))
        if both:
            raise ParameterError(f"The parameter {', '.join(map(repr, both))} of {member!r} is given twice: in the "
                                 f"method {name!r} and as a separate parameter. Give it once.")
        cls = get_detector_class(member)
        given = {**inline, **params}
        _check_params(cls, member, given)
        return cls(**given)
    cls = get_detector_class("ensemble")
    for member, _ in members:
        get_detector_class(member)  # unknown names first, with the list of known ones
    _check_ensemble_params(cls, members, params)
    return cls(members=members, **params)


def _check_ensemble_params(cls: type[Detector], members: list[tuple[str, dict[str, Any]]],
                           params: dict[str, Any]) -> None:
    """An ensemble's keyword parameters must be its own; a member's parameter is refused with the method string
    that sets it on that member (``--method turn,knn --no-finetune`` -> ``--method "turn(finetune=false),knn"``)."""
    own = _known(cls)
    unknown = sorted(set(params) - set(own))
    if not unknown:
        return
    fixed = []
    for member, inline in members:
        mine = {k: params[k] for k in unknown if k in _known(get_detector_class(member))}
        fixed.append((member, {**inline, **mine}))
    takers = {k for k in unknown for m, _ in members if k in _known(get_detector_class(m))}
    hint = ""
    if takers:
        hint = (f" A member's parameters go in the method string, NAME(KEY=VALUE, ...): "
                f"--method \"{format_method(fixed)}\" (API: method=\"{format_method(fixed)}\").")
    raise ParameterError(f"The 'ensemble' detector has no parameter {', '.join(map(repr, unknown))}. Its own "
                         f"parameters are: {', '.join(own)}.{hint}"
                         + ("" if takers == set(unknown) else
                            f" No member takes {', '.join(repr(k) for k in unknown if k not in takers)}."))


def _known(cls: type[Detector]) -> list[str]:
    sig = inspect.signature(cls.__init__)
    return [p for p in sig.parameters if p != "self"]


def _check_params(cls: type[Detector], name: str, params: dict[str, Any]) -> None:
    """Unknown parameter names raise a ParameterError that lists the detector's parameters."""
    sig = inspect.signature(cls.__init__)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    known = _known(cls)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ParameterError(f"The {name!r} detector has no parameter {', '.join(map(repr, unknown))}. Its "
                             f"parameters are: {', '.join(known) or 'none'}. Leave out the option or choose a "
                             "detector that takes it ('labelsieve detectors' lists them).")


def list_detectors(pattern: str = "*") -> list[str]:
    """Registered detector names matching the fnmatch ``pattern``, sorted."""
    _discover()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
