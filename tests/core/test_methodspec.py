"""The ``--method`` syntax: members with their own parameters, read and written back."""

from __future__ import annotations

import pytest

from labelsieve.core.errors import ParameterError
from labelsieve.core.methodspec import format_method, parse_method, parse_value


def test_members_and_values_are_read_as_documented():
    assert parse_method("knn") == [("knn", {})]
    assert parse_method(" turn(finetune=false) , knn(k=10, decision=threshold)") == [
        ("turn", {"finetune": False}), ("knn", {"k": 10, "decision": "threshold"})]
    # JSON values (numbers, booleans, null, quoted strings and lists, commas inside them), else the text itself
    got = parse_method('deft(logit_scale=calibrated, lr=3e-2, ctx_init="a photo, of a", image_size=null),'
                       'ensemble_like(weights=[1, 2.5], max-steps=100)')
    assert got == [("deft", {"logit_scale": "calibrated", "lr": 0.03, "ctx_init": "a photo, of a", "image_size": None}),
                   ("ensemble_like", {"weights": [1, 2.5], "max_steps": 100})]
    assert parse_value(" true ") is True and parse_value("0.25") == 0.25 and parse_value("rrc") == "rrc"
    assert parse_method("codivide()") == [("codivide", {})]


@pytest.mark.parametrize("members", [
    [("codivide", {"frozen": True, "epochs": 10, "lr": 0.002, "text_budget": 32000}), ("turn", {"finetune": False}),
     "knn"],
    [("deft", {"ctx_init": "a photo of a", "logit_scale": "calibrated"}), ("knn", {"k": 5})],
    [("deft", {"ctx_init": "a, b (c)", "weights": [1.0, 2.0]})],
])
def test_format_is_read_back(members):
    text = format_method(members)
    assert parse_method(text) == [(m, {}) if isinstance(m, str) else m for m in members], text


@pytest.mark.parametrize("bad, message", [
    ("", "non-empty"), ("turn(finetune=false", "unclosed"), ("turn)", "closing"), ("turn(finetune)", "needs a value"),
    ("turn(k=1, k=2)", "given twice"), ("turn,,knn", "not a detector name"), ("tu rn", "not a detector name"),
    ("turn(k=1)x", "must end with"), ('deft(ctx_init="a)', "unclosed quote"),
])
def test_malformed_strings_are_refused_with_the_syntax(bad, message):
    with pytest.raises(ParameterError, match=message):
        parse_method(bad)
