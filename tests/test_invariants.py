"""Invariants every tiered model keeps, over tiny models x strategies."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import BUILDERS, STRATEGIES

from nnobfuscator import InputSpec, TieredModel, obfuscate

KEY = bytes(range(32))


def make_tiered(model_name: str, strategy: str) -> tuple[torch.nn.Module, TieredModel]:
    base = BUILDERS[model_name]()
    tiered = obfuscate(
        base,
        tiers="free=60%,pro=85%,premium=full",
        strategy=strategy,
        key=KEY,
        input_spec=InputSpec(1, 8, 8),
    )
    for tier, share in (("free", 0.6), ("pro", 0.3)):
        tiered.set_strength(tier, strategy, share * tiered.strategies[strategy].max_strength)
    return base, tiered


@pytest.fixture(
    params=[(m, s) for m in BUILDERS for s in STRATEGIES], ids=lambda p: f"{p[0]}-{p[1]}"
)
def case(request, digits8):
    model_name, strategy = request.param
    reference = BUILDERS[model_name]()  # same seed, same weights as the wrapped one
    base, tiered = make_tiered(model_name, strategy)
    x = digits8["test"].images[:12]
    with torch.inference_mode():
        expected_full = reference(x)
    return base, tiered, x, expected_full, model_name, strategy


@torch.inference_mode()
def test_full_tier_is_bit_exact(case):
    _, tiered, x, expected_full, *_ = case
    assert torch.equal(tiered(x, tier="premium"), expected_full)
    with tiered.disable_tiers():
        assert torch.equal(tiered(x), expected_full)


@torch.inference_mode()
def test_lower_tiers_change_outputs_and_degrade_in_order(case):
    _, tiered, x, expected_full, *_ = case
    free, pro = tiered(x, tier="free"), tiered(x, tier="pro")
    distance_free = (free - expected_full).norm()
    distance_pro = (pro - expected_full).norm()
    assert distance_pro > 0
    assert distance_free > distance_pro


@torch.inference_mode()
def test_mixed_batch_equals_per_tier_runs(case):
    _, tiered, x, *_ = case
    names = ["free", "premium", "pro"] * 4
    mixed = tiered(x, tiers=names)
    for tier in set(names):
        rows = [i for i, name in enumerate(names) if name == tier]
        torch.testing.assert_close(mixed[rows], tiered(x[rows], tier=tier), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_same_input_same_output(case):
    _, tiered, x, *_ = case
    first = tiered(x, tier="free")
    for _ in range(3):
        assert torch.equal(tiered(x, tier="free"), first)
    # a sample's output does not depend on which other samples share its batch
    torch.testing.assert_close(tiered(x[3:4], tier="free"), first[3:4], rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_save_load_gives_identical_outputs(case, tmp_path):
    _, tiered, x, _, model_name, _ = case
    tiered.save_pretrained(str(tmp_path))
    fresh_base = BUILDERS[model_name]()
    loaded = TieredModel.from_pretrained(str(tmp_path), fresh_base)
    for tier in tiered.tier_names:
        assert torch.equal(loaded(x, tier=tier), tiered(x, tier=tier))
    assert loaded.tiers["free"].params == tiered.tiers["free"].params


@torch.inference_mode()
def test_unload_restores_the_original_model(case):
    base, tiered, x, expected_full, *_ = case
    keys_before = set(BUILDERS[case[4]]().state_dict())
    original = tiered.unload()
    assert original is base
    assert set(original.state_dict()) == keys_before
    assert torch.equal(original(x), expected_full)


def test_errors_teach(case):
    _, tiered, x, *_ = case
    with pytest.raises(ValueError, match="unknown tier 'gold'.*free"):
        tiered(x, tier="gold")
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, 8, 8\)"):
        tiered(torch.zeros(2, 3, 8, 8), tier="free")
    with pytest.raises(ValueError, match="4-d image batch"):
        tiered(torch.zeros(8, 8), tier="free")
    with pytest.raises(ValueError, match="one tier name per sample"):
        tiered(x, tiers=["free"])
    with pytest.raises(ValueError, match="not both"):
        tiered(x, tier="free", tiers=["free"] * len(x))


def test_uncalibrated_tier_refuses_to_run(digits8):
    tiered = obfuscate(
        BUILDERS["cnn"](), tiers="free=0.5,premium=full", key=KEY, strategy="feature-mix"
    )
    with pytest.raises(RuntimeError, match="not calibrated"):
        tiered(digits8["test"].images[:2], tier="free")


@torch.inference_mode()
def test_default_tier_is_the_lowest_and_notebook_helpers_scope(digits8):
    _, tiered = make_tiered("cnn", "feature-mix")
    x = digits8["test"].images[:4]
    assert torch.equal(tiered(x), tiered(x, tier="free"))
    with tiered.use_tier("premium"):
        assert torch.equal(tiered(x), tiered(x, tier="premium"))
    tiered.set_tier("pro")
    assert torch.equal(tiered(x), tiered(x, tier="pro"))
    explicit = tiered(x, tier="free")  # an explicit tier beats the notebook default
    assert torch.equal(explicit, tiered.forward_tier(x, "free"))
    assert not torch.equal(explicit, tiered(x))


@torch.inference_mode()
def test_concurrent_requests_never_see_each_others_tier(digits8):
    _, tiered = make_tiered("resnet", "feature-mix")
    x = digits8["test"].images[:6]
    expected = {tier: tiered(x, tier=tier) for tier in tiered.tier_names}
    failures: list[str] = []

    def worker(tier: str) -> None:
        with torch.inference_mode():
            for _ in range(5):
                if not torch.equal(tiered(x, tier=tier), expected[tier]):
                    failures.append(tier)

    threads = [threading.Thread(target=worker, args=(t,)) for t in tiered.tier_names * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_status_lists_tiers_strategy_and_layers():
    _, tiered = make_tiered("resnet", "feature-mix")
    rows = tiered.status()
    assert [r["tier"] for r in rows] == ["free", "pro", "premium"]
    assert rows[0]["strategy"] == "feature-mix" and rows[-1]["strategy"] == "none"
    layers = tiered.describe()["strategies"]["feature-mix"]
    # the generic default: the middle of the network, neither the stem nor the head
    assert "conv1" not in layers and "fc" not in layers and "layer1.0.conv1" not in layers
    assert {"layer3.0.conv1", "layer4.0.conv2"} <= set(layers)


def test_different_keys_give_different_tiers(digits8):
    x = digits8["test"].images[:4]
    outputs = []
    for key in (KEY, bytes(reversed(KEY))):
        tiered = obfuscate(
            BUILDERS["cnn"](), tiers="free=0.5,premium=full", key=key, strategy="feature-mix"
        )
        tiered.set_strength("free", "feature-mix", 0.8)
        with torch.inference_mode():
            outputs.append(tiered(x, tier="free"))
    assert not torch.allclose(outputs[0], outputs[1])


def test_max_pooling_runs_channels_last_exactly_and_unloads():
    from torch import nn

    from nnobfuscator.core.wrapping import ChannelsLastMaxPool

    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.MaxPool2d(4),  # 4x4 -> 1x1: both layouts count as contiguous
        nn.Conv2d(4, 3, 1),
        nn.Flatten(),
    )
    reference = [module for module in base]
    x = torch.randn(5, 1, 8, 8)
    with torch.inference_mode():
        expected = base(x)
        tiered = obfuscate(
            base,
            tiers="free=60%,premium=full",
            key=KEY,
            input_spec=InputSpec(1, 8, 8),
            strategy="feature-mix",
        )
        assert isinstance(base[1], ChannelsLastMaxPool) and isinstance(base[3], ChannelsLastMaxPool)
        pooled = base[3](torch.randn(2, 4, 4, 4))
        assert pooled.stride() == (4, 1, 1, 1)  # the default layout's strides, not channels-last
        assert torch.equal(tiered(x, tier="premium"), expected)
        tiered.unload()
    assert [module for module in base] == reference
