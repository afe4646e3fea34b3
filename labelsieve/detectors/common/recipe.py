"""A detector's parameters declared once, as data: default, check, and where the value comes from.

Each paper-based detector declares a :class:`Recipe`, a table of :class:`Param` rows. The recipe
gives the detector its keyword-only ``__init__`` signature (:meth:`Recipe.signature`), validates and
stores the parameters in the project's one message format (:meth:`Recipe.bind`), and describes the
resolved run for ``labelsieve detectors --show NAME`` and for audit.json (:meth:`Recipe.rows`,
:meth:`Recipe.format`): every hyperparameter with its value, ``paper`` or ``labelsieve`` beside it, and
the section, table or authors' file it comes from.

Origins
-------
``paper``
    The value the paper (or its authors' released code) uses. ``source`` names where.
``labelsieve``
    labelsieve's own value: the paper gives none we could read, the setting has no counterpart in
    the paper (workers, mixed precision, a fallback path), or labelsieve departs from the paper on
    purpose. ``note`` says why; docs/methods.md gives the measured effect.
``user``
    The caller set a value other than the default and other than the paper's.

A :meth:`Recipe.rows` row whose value equals the paper's value says ``paper`` whoever set it.

Examples
--------
>>> R = Recipe("Demo", "Demo et al. 2024", [
...     Param("epochs", 10, "paper", "§4.1", check=is_int(1), expected="an int >= 1"),
...     Param("workers", None, "labelsieve", note="no counterpart in the paper")])
>>> class Demo:
...     def __init__(self, **params): R.bind(self, params)
>>> Demo(epochs=3).epochs
3
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from labelsieve.core.defaults import AMP_MODES
from labelsieve.core.errors import ParameterError, check_param

__all__ = ["ORIGINS", "UNKNOWN", "Param", "Recipe", "amp_param", "is_float", "is_int", "one_of", "workers_param"]

ORIGINS = ("paper", "labelsieve")
#: ``Param.paper`` for a setting the paper has but whose value is not in the sources we could read.
UNKNOWN = "not in our sources"
_UNSET = object()


def is_int(lo: int | None = None, hi: int | None = None, *, none: bool = False) -> Callable[[Any], bool]:
    """A check: an int (not a bool) in ``[lo, hi]``; None too when ``none``."""

    def check(v: Any) -> bool:
        if v is None:
            return none
        return (isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)
                and (hi is None or v <= hi))

    return check


def is_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
             none: bool = False) -> Callable[[Any], bool]:
    """A check: a finite real number (not a bool) in the interval; None too when ``none``."""

    def check(v: Any) -> bool:
        if v is None:
            return none
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    return check


def one_of(*choices: Any) -> Callable[[Any], bool]:
    """A check: one of ``choices`` (compared with ``==``, bools only to bools)."""

    def check(v: Any) -> bool:
        return any(v is c if isinstance(c, bool) or isinstance(v, bool) else v == c for c in choices)

    return check


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a recipe.

    Attributes
    ----------
    name : str
        The keyword argument.
    default : object
        Its default value (what ``--method NAME`` runs).
    origin : {"paper", "labelsieve"}
        Where the default comes from (see the module docstring).
    source : str
        The paper's section/table or the authors' file and line the value comes from; for a
        ``labelsieve`` default, the paper's reference this departs from, if any.
    note : str
        Why (for ``labelsieve`` defaults), or what the value means.
    paper : object
        The paper's value when the default departs from it (``origin="labelsieve"``), or
        :data:`UNKNOWN` when the paper has a value we could not read; omitted: the default is the
        paper's (``origin="paper"``) or the paper has no such setting (``"labelsieve"``).
    check : callable, optional
        ``check(value) -> bool``; False raises :class:`~labelsieve.core.errors.ParameterError`.
    expected : str
        What a valid value is, for the error message ("an int >= 1").
    convert : callable, optional
        Applied to a valid value before it is stored (e.g. ``float``).
    """

    name: str
    default: Any
    origin: str = "labelsieve"
    source: str = ""
    note: str = ""
    paper: Any = field(default=_UNSET, repr=False)
    check: Callable[[Any], bool] | None = field(default=None, repr=False, compare=False)
    expected: str = ""
    convert: Callable[[Any], Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.origin not in ORIGINS:
            raise ValueError(f"Param {self.name!r}: origin must be one of {ORIGINS}; got {self.origin!r}")
        if self.check is not None and not self.check(self.default):
            raise ValueError(f"Param {self.name!r}: the default {self.default!r} fails its own check")

    @property
    def paper_value(self) -> Any:
        """The paper's value: the default for ``paper`` rows, :attr:`paper` when given, else None."""
        if self.origin == "paper":
            return self.default
        return None if self.paper is _UNSET else self.paper

    @property
    def has_paper_value(self) -> bool:
        return self.origin == "paper" or self.paper is not _UNSET


def amp_param(**kw: Any) -> Param:
    """The ``amp`` parameter every training detector has: mixed precision on CUDA (labelsieve's)."""
    return Param("amp", "auto", "labelsieve", **{"note": "mixed precision on CUDA: bf16, or fp16 with a GradScaler; "
                                                         "fp32 master weights", **kw},
                 check=one_of(*AMP_MODES), expected=f"one of {', '.join(map(repr, AMP_MODES))}")


def workers_param(note: str) -> Param:
    """The ``num_workers`` parameter (DataLoader workers; None: the machine's default)."""
    return Param("num_workers", None, "labelsieve", note=note, check=is_int(0, none=True),
                 expected="None or an int >= 0")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return bool(a == b)


class Recipe:
    """The parameter table of one detector (see the module docstring).

    Parameters
    ----------
    owner : str
        The detector class name, used in error messages.
    reference : str
        The paper (and the authors' code, where read) the recipe follows.
    params : sequence of Param
        In signature order; names must be unique.
    fixed : sequence of Param, optional
        Settings of the method that are not parameters (a loss detail, an initialisation), listed by
        :meth:`rows` and :meth:`format` so that the table covers every hyperparameter.
    """

    def __init__(self, owner: str, reference: str, params: Sequence[Param], fixed: Sequence[Param] = ()) -> None:
        names = [p.name for p in [*params, *fixed]]
        if len(set(names)) != len(names):
            raise ValueError(f"{owner}: duplicate parameter names in its recipe")
        self.owner = owner
        self.reference = reference
        self.params: dict[str, Param] = {p.name: p for p in params}
        self.fixed: dict[str, Param] = {p.name: p for p in fixed}

    def __iter__(self) -> Iterable[Param]:  # type: ignore[override]
        return iter(self.params.values())

    def __getitem__(self, name: str) -> Param:
        return self.params[name]

    @property
    def defaults(self) -> dict[str, Any]:
        """Every parameter's default, in order."""
        return {p.name: p.default for p in self.params.values()}

    def paper_values(self) -> dict[str, Any]:
        """The parameters whose paper value is known, with that value."""
        return {p.name: p.paper_value for p in self.params.values() if p.has_paper_value}

    def signature(self) -> inspect.Signature:
        """``(self, *, name=default, ...)``: what ``inspect.signature`` and ``help()`` show for ``__init__``."""
        kw = [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default)
              for p in self.params.values()]
        return inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *kw])

    def init_method(self) -> Callable[..., None]:
        """An ``__init__`` taking the recipe's keyword-only parameters (its signature is
        :meth:`signature`): it binds them (:meth:`bind`), then calls ``self._check_params()`` for checks
        that involve several parameters."""
        recipe = self

        def __init__(self: Any, **params: Any) -> None:
            recipe.bind(self, params)
            self._check_params()

        __init__.__signature__ = self.signature()  # type: ignore[attr-defined]
        __init__.__doc__ = f"Parameters: see ``{self.owner}.recipe`` (``labelsieve detectors --show``)."
        return __init__

    def bind(self, obj: object, given: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``given`` against the recipe, fill the defaults and set them as attributes of ``obj``.

        Raises
        ------
        ParameterError
            For an unknown name (listing the known ones) or a value that fails its check.
        """
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise ParameterError(f"{self.owner} has no parameter {', '.join(map(repr, unknown))}. Its parameters "
                                 f"are: {', '.join(self.params)}.")
        values: dict[str, Any] = {}
        for p in self.params.values():
            v = given.get(p.name, p.default)
            if p.check is not None:
                check_param(self.owner, p.name, v, bool(p.check(v)), p.expected or "a valid value")
            if p.convert is not None and v is not None:
                v = p.convert(v)
            values[p.name] = v
            setattr(obj, p.name, v)
        return values

    def rows(self, values: Mapping[str, Any] | None = None,
             resolved: Mapping[str, tuple[Any, str]] | None = None) -> list[dict[str, Any]]:
        """The recipe as a table, one dict per parameter (JSON-serialisable where the values are).

        Parameters
        ----------
        values : mapping, optional
            The values in use (a detector's ``get_params()``); default the recipe's defaults.
        resolved : mapping of name to (value, reason), optional
            Values decided at run time from a setting such as ``"auto"`` (the PEFT method a tower
            allows, the fitted logit scale), with the reason.

        Returns
        -------
        list of dict
            ``name``, ``value``, ``origin`` (``paper`` / ``labelsieve`` / ``user``), ``paper`` (the
            paper's value or None when unknown), ``source``, ``note``, ``fixed`` (True for the settings
            that are not parameters), and ``resolved`` / ``reason`` when resolved at run time (the
            origin then describes the resolved value).
        """
        values = dict(self.defaults if values is None else values)
        resolved = dict(resolved or {})
        out = []
        for p in [*self.params.values(), *self.fixed.values()]:
            v = values.get(p.name, p.default)
            actual = resolved[p.name][0] if p.name in resolved else v
            if p.has_paper_value and _same(actual, p.paper_value):
                origin = "paper"
            elif _same(v, p.default):
                origin = p.origin if p.name not in resolved or p.origin != "paper" else "labelsieve"
            else:
                origin = "user"
            row: dict[str, Any] = {"name": p.name, "value": v, "origin": origin,
                                   "paper": p.paper_value if p.has_paper_value else None,
                                   "source": p.source, "note": p.note, "fixed": p.name in self.fixed}
            if p.name in resolved:
                row["resolved"], row["reason"] = resolved[p.name]
            out.append(row)
        return out

    def departures(self, values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The parameter rows of :meth:`rows` that are not the paper's recipe: set by the caller away from the
        default (``user``), or labelsieve's default where the paper has a value (known or not)."""
        return [r for r in self.rows(values) if not r["fixed"] and r["origin"] != "paper"
                and (r["origin"] == "user" or r["paper"] is not None)]

    def format(self, values: Mapping[str, Any] | None = None, *, width: int = 110) -> str:
        """The table of :meth:`rows` as plain text (``labelsieve detectors --show``)."""
        rows = self.rows(values)
        lines = [f"{self.owner}: {self.reference}", "",
                 f"{'parameter':<20} {'value':<16} {'origin':<10} {'paper value':<13} source / why"]
        for r in rows:
            if r["fixed"]:
                continue
            paper = ("–" if r["paper"] is None and r["origin"] != "paper" else "?" if r["paper"] == UNKNOWN
                     else _short(r["paper"], 13))
            why = "; ".join(x for x in (r["source"], r["note"]) if x)
            lines.append(_wrap(f"{r['name']:<20} {_short(r['value'], 16):<16} {r['origin']:<10} {paper:<13} {why}",
                               width, indent=63))
        fixed = [r for r in rows if r["fixed"]]
        if fixed:
            lines += ["", "Fixed settings (not parameters):"]
            for r in fixed:
                paper = "" if r["origin"] == "paper" else f" (paper: {r['paper']})"
                why = "; ".join(x for x in (r["source"], r["note"]) if x)
                lines.append(_wrap(f"{r['name']:<20} {r['origin']:<10} {r['value']}{paper}. {why}", width, indent=32))
        lines += ["", "origin: paper = the paper's or its authors' code's value; labelsieve = labelsieve's own (the "
                  "paper gives none we could read, or labelsieve departs on purpose: docs/methods.md says why and "
                  "what it measured); ? = the paper has a value that is not in our sources; – = the paper has no "
                  "such setting."]
        return "\n".join(lines[:-1] + [_wrap(lines[-1], width, indent=0)])


def _short(v: Any, n: int) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def _wrap(line: str, width: int, indent: int) -> str:
    if len(line) <= width:
        return line
    out, cur = [], line
    while len(cur) > width:
        cut = cur.rfind(" ", indent, width)
        cut = cut if cut > indent else width
        out.append(cur[:cut])
        cur = " " * indent + cur[cut:].lstrip()
    out.append(cur)
    return "\n".join(out)
