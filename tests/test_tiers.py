"""Tier specs parse, sort and reject bad input with messages that teach."""

from __future__ import annotations

import pytest

from nnobfuscator import Target, parse_tiers


def test_parse_sorts_lowest_first_and_keeps_specs():
    tiers = parse_tiers("premium=full,free=60%,pro=85%")
    assert [t.name for t in tiers] == ["free", "pro", "premium"]
    assert [t.target.kind for t in tiers] == ["relative", "relative", "full"]
    assert tiers[0].target.value == pytest.approx(0.6)
    assert tiers[0].target.spec == "60%"


def test_targets_resolve():
    assert Target.parse("60%").resolve(0.9) == pytest.approx(0.54)
    assert Target.parse(0.6).resolve(0.9) == pytest.approx(0.6)
    assert Target.parse("full").resolve(0.9) is None


def test_list_and_mapping_forms():
    tiers = parse_tiers([{"name": "free", "target": 0.5, "max_cost": 0.5}, "premium=full"])
    assert tiers[0].max_cost == 0.5
    assert [t.name for t in parse_tiers({"a": "0.3", "b": "full"})] == ["a", "b"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("free=sixty", "bad tier target"),
        ("free=150%", r"must lie in \(0, 1\]"),
        ("free=0", r"must lie in \(0, 1\]"),
        ("free", "name=target"),
        ("", "no tiers given"),
        ("a=0.5,a=0.6", "duplicate tier names"),
        ("a=full,b=full", "only one tier can be 'full'"),
        ("a=0.5,b=60%", "mix of absolute"),
        ("9lives=0.5", "bad tier name"),
    ],
)
def test_bad_specs_raise_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_tiers(spec)


def test_bad_max_cost():
    with pytest.raises(ValueError, match="max_cost"):
        parse_tiers([{"name": "free", "target": 0.5, "max_cost": 2}])
