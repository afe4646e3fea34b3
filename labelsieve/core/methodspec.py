"""The ``--method`` syntax: one detector, or an ensemble whose members carry their own parameters.

::

    knn                                   one detector (its parameters from -p KEY=VALUE or the API's params)
    deft(logit_scale=calibrated)          one detector with parameters written in place
    turn(finetune=false),knn(k=10)        an ensemble of two members, each with its own parameters
    codivide,turn,knn                     an ensemble of members with their own defaults

A member is ``NAME`` or ``NAME(KEY=VALUE, ...)``; members are separated by commas outside parentheses. A
value is read as JSON when it parses (``10``, ``0.5``, ``true``, ``false``, ``null``, ``"a, b"``,
``[1, 2]``), else as the text itself (``calibrated``), as ``-p KEY=VALUE`` reads it. Dashes in keys become
underscores. The same string works on the command line (``--method``) and in the API (``method=``); for an
ensemble, ``-p`` / ``params`` hold the ensemble's own parameters (``combine``, ``weights``,
``trusted_weight``) and :func:`format_method` writes any member list back in this syntax (the default
ensemble included, ``labelsieve detectors --show ensemble``).

This module is plain Python (no torch) so that the CLI can read and write the syntax without importing
the detectors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from labelsieve.core.errors import ParameterError

__all__ = ["METHOD_SYNTAX", "format_method", "format_value", "parse_method", "parse_value"]

#: One line naming the syntax, for messages and help texts.
METHOD_SYNTAX = "NAME, NAME(KEY=VALUE, ...), or several of them separated by commas for an ensemble"


def parse_value(text: str) -> Any:
    """``text`` as JSON when it parses, else the text itself (stripped)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def format_value(value: Any) -> str:
    """``value`` as :func:`parse_value` reads it back: JSON, except plain words without quotes."""
    if isinstance(value, str) and value == value.strip() and value and not any(c in value for c in ',()="[]{}') \
            and parse_value(value) == value:
        return value
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def _split_top(text: str, sep: str, spec: str) -> list[str]:
    """``text`` split at ``sep`` outside parentheses, brackets, braces and double quotes."""
    parts, depth, quoted, escaped, cur = [], 0, False, False, []
    for ch in text:
        if quoted:
            cur.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise ParameterError(f"The method {spec!r} has a closing {ch!r} without an opening one. Write "
                                     f"{METHOD_SYNTAX}, e.g. 'turn(finetune=false),knn'.")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth or quoted:
        raise ParameterError(f"The method {spec!r} has an unclosed {'quote' if quoted else 'parenthesis'}. Write "
                             f"{METHOD_SYNTAX}, e.g. 'turn(finetune=false),knn'.")
    parts.append("".join(cur))
    return parts


def parse_method(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """The members of a method string, each ``(name, params)`` (see the module docstring).

    Raises
    ------
    ParameterError
        For an empty member, a name that is not an identifier, a parameter without ``=``, a parameter given
        twice, or unbalanced parentheses or quotes; the message shows the syntax.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ParameterError(f"The method must be a non-empty string: {METHOD_SYNTAX}. Got {spec!r}.")
    out: list[tuple[str, dict[str, Any]]] = []
    for raw in _split_top(spec, ",", spec):
        member = raw.strip()
        name, args = member, ""
        if "(" in member:
            if not member.endswith(")"):
                raise ParameterError(f"The method member {member!r} in {spec!r} must end with ')' after its "
                                     f"parameters: NAME(KEY=VALUE, ...).")
            name, args = member[: member.index("(")].strip(), member[member.index("(") + 1 : -1]
        if not name.isidentifier():
            raise ParameterError(f"The method {spec!r} has a member {member!r} that is not a detector name. Write "
                                 f"{METHOD_SYNTAX}, e.g. 'turn(finetune=false),knn'.")
        params: dict[str, Any] = {}
        for item in _split_top(args, ",", spec) if args.strip() else []:
            if "=" not in item:
                raise ParameterError(f"The parameter {item.strip()!r} of {name!r} in the method {spec!r} needs a "
                                     f"value: KEY=VALUE, e.g. '{name}(k=10)'.")
            key, value = item.split("=", 1)
            key = key.strip().replace("-", "_")
            if key in params:
                raise ParameterError(f"The parameter {key!r} of {name!r} is given twice in the method {spec!r}.")
            params[key] = parse_value(value)
        out.append((name, params))
    return out


def format_method(members: Sequence[str | tuple[str, Mapping[str, Any]] | Sequence[Any]]) -> str:
    """A member list (names or ``(name, params)`` pairs) in the method syntax; :func:`parse_method` reads it back."""
    parts = []
    for m in members:
        name, params = (m, {}) if isinstance(m, str) else (m[0], dict(m[1]))
        inner = ",".join(f"{k}={format_value(v)}" for k, v in params.items())
        parts.append(f"{name}({inner})" if inner else name)
    return ",".join(parts)
