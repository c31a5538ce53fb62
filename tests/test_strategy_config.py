"""Typed strategy options: validated once, and what an artifact saves is what it loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_cnn

from nnobfuscator import FeatureMixConfig, StrategyConfig, TieredModel, obfuscate
from nnobfuscator.strategies import get_strategy, list_strategies, strategy_config

KEY = b"c" * 32


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block": 1}, "integer >= 2"),
        ({"block": True}, "integer >= 2"),
        ({"block": 8.0}, "integer >= 2"),
        ({"permute": "yes"}, "true or false"),
        ({"targets": "layer4"}, "list of module-name patterns"),
    ],
)
def test_bad_options_are_refused_when_the_config_is_made(options, message):
    with pytest.raises(ValueError, match=message):
        FeatureMixConfig(**options)


def test_an_unknown_option_names_the_ones_the_strategy_takes():
    with pytest.raises(ValueError, match=r"unknown options \['blok'\]; it takes \['block', "):
        strategy_config({"name": "feature-mix", "blok": 8})
    with pytest.raises(ValueError, match=r"unknown options \['block'\]; it takes \['targets'\]"):
        strategy_config({"name": "class-merge", "block": 8})
    with pytest.raises(ValueError, match="unknown strategy 'mix'"):
        strategy_config("mix")


def test_every_strategy_has_a_config_class_that_round_trips():
    for name in list_strategies():
        config_class = get_strategy(name).config_class
        assert issubclass(config_class, StrategyConfig)
        config = strategy_config(name)
        assert type(config) is config_class and config.name == name
        assert strategy_config(json.loads(json.dumps(config.to_dict()))) == config


def test_obfuscate_takes_a_typed_config_and_the_artifact_keeps_it(tmp_path):
    options = FeatureMixConfig(block=4, targets=["2", "5"])
    tiered = obfuscate(tiny_cnn(), tiers="free=0.5,premium=full", strategy=options, key=KEY)
    strategy = tiered.strategies["feature-mix"]
    assert strategy.options == options and strategy.block == 4
    tiered.set_strength("free", "feature-mix", 0.8)
    tiered.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["strategies"][0]
    assert {k: saved[k] for k in ("name", "block", "permute", "targets")} == {
        "name": "feature-mix",
        "block": 4,
        "permute": False,
        "targets": ["2", "5"],
    }
    loaded = TieredModel.from_pretrained(tmp_path, tiny_cnn())
    assert loaded.strategies["feature-mix"].options == options
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, tier="free"), tiered(x, tier="free"))


def test_a_block_other_than_the_default_changes_the_mix():
    x = torch.randn(4, 1, 8, 8)
    outputs = []
    for block in (2, 16):
        tiered = obfuscate(
            tiny_cnn(),
            tiers="free=0.5,premium=full",
            strategy=FeatureMixConfig(block=block),
            key=KEY,
        )
        tiered.set_strength("free", "feature-mix", 1.0)
        with torch.no_grad():
            outputs.append(tiered(x, tier="free"))
    assert not torch.allclose(outputs[0], outputs[1])


def test_a_list_mixes_configs_and_names_and_refuses_compute_strategies():
    tiered = obfuscate(
        tiny_cnn(),
        tiers="free=0.5,premium=full",
        key=KEY,
        strategy=[FeatureMixConfig(block=8), "weight-noise"],
    )
    assert list(tiered.strategies) == ["feature-mix", "weight-noise"]
    with pytest.raises(ValueError, match="compute strategy"):
        obfuscate(tiny_cnn(), strategy=StrategyConfig(name="block-skip"), key=KEY)
    with pytest.raises(ValueError, match="a name, a strategy config"):
        obfuscate(tiny_cnn(), strategy=[3], key=KEY)
