"""Compute-saving tiers: skipped work never runs, costs fall, budgets are enforced."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from conftest import trained
from test_calibration import schema
from torch import nn
from torchvision.models import ResNet
from torchvision.models.resnet import BasicBlock, Bottleneck

from nnobfuscator import CalibrationError, TieredModel, calibrate, obfuscate
from nnobfuscator.core.tiers import parse_tiers
from nnobfuscator.strategies import TieredBlock
from nnobfuscator.tiered.cost import relative_costs, tier_flops
from nnobfuscator.tiered.obfuscate import resolve_compute

KEY = b"c" * 32
#: every compute strategy that applies to a ResNet ("auto" leaves channel slimming out there)
EVERY = "block-skip+channel-slim+input-resolution"


def two_block_resnet(block: type[nn.Module] = BasicBlock) -> nn.Module:
    """A small torchvision ResNet with two blocks per stage (so some blocks are skippable)."""
    torch.manual_seed(0)
    model = ResNet(block, [2, 2, 1, 1], num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    for module in model.modules():  # non-trivial BN statistics, as after training
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def manual(model: nn.Module, compute: str, settings: dict[str, dict]) -> TieredModel:
    """A tiered model whose 'free' tier runs ``settings`` (no degrading strength)."""
    tiered = obfuscate(
        model, tiers="free=0.5,premium=full", compute=compute, key=KEY, strategy="feature-mix"
    )
    tiered.set_strength("free", "feature-mix", 0.0)
    for name, strategy in tiered.compute.items():
        tiered.set_setting("free", name, settings.get(name, strategy.default_setting()))
    return tiered


def test_skipped_blocks_never_run():
    model = two_block_resnet()
    tiered = manual(model, "block-skip", {"block-skip": {"skip": ["layer1.1", "layer2.1"]}})
    calls: dict[str, int] = {}
    for name in ("layer1.1", "layer2.1", "layer1.0"):
        for sub, module in tiered.base_model.get_submodule(name).base_block.named_modules():
            module.register_forward_hook(
                lambda *_, key=f"{name}.{sub}": calls.__setitem__(key, calls.get(key, 0) + 1)
            )
    x = torch.randn(3, 1, 8, 8)
    with torch.inference_mode():
        tiered(x, tier="free")
    assert calls and all(key.startswith("layer1.0") for key in calls), calls
    with torch.inference_mode():
        tiered(x, tier="premium")
    assert calls.get("layer1.1.conv1") == 1 and calls.get("layer2.1.bn2") == 1


def test_skip_lowers_flops_and_only_identity_blocks_are_skippable():
    tiered = manual(two_block_resnet(), "block-skip", {"block-skip": {"skip": ["layer1.1"]}})
    assert sorted(tiered.compute["block-skip"].layers) == ["layer1.0", "layer1.1", "layer2.1"]
    costs = relative_costs(tiered, torch.randn(1, 1, 8, 8))
    assert 0.5 < costs["free"] < 1.0 and costs["premium"] == 1.0
    with pytest.raises(ValueError, match="not skippable"):
        tiered.set_setting("free", "block-skip", {"skip": ["layer2.0"]})


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_channel_slim_runs_smaller_convs_equal_to_mean_filled_channels(block):
    """Slimmed blocks compute what the full block computes with dropped channels at their mean."""
    model = two_block_resnet(block)
    tiered = manual(model, "channel-slim", {"channel-slim": {"keep": {"layer2": 0.5}}})
    wrapper = tiered.base_model.get_submodule("layer2.1")
    assert isinstance(wrapper, TieredBlock)
    x = torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        slim = tiered(x, tier="free")
    # Reference: run the untouched blocks, overwriting dropped inner channels with their fill.
    reference_hooks = []
    for name in ("layer2.0", "layer2.1"):
        blk = tiered.base_model.get_submodule(name)
        order = blk.slimmer.order()
        for space, reader in enumerate(["conv2", "conv3"][: len(order)]):
            keep = max(1, round(0.5 * len(order[space])))
            dropped = order[space][keep:]
            assert len(dropped) > 0
            mean = blk.slimmer.activation_stats()[space][0]

            def fill(module, args, dropped=dropped, mean=mean):
                (a,) = args
                a = a.clone()
                a[:, dropped] = mean[dropped].view(1, -1, 1, 1)
                return (a,)

            conv = getattr(blk.base_block, reader)
            reference_hooks.append(conv.register_forward_pre_hook(fill))
    with torch.inference_mode():
        reference = tiered(x, tier="premium")
    for handle in reference_hooks:
        handle.remove()
    torch.testing.assert_close(slim, reference, rtol=1e-4, atol=1e-4)
    full = tier_flops(tiered, x[:1], None)
    assert tier_flops(tiered, x[:1], "free") < 0.95 * full


def test_input_resolution_restores_dense_output_size():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    tiered = manual(dense, "input-resolution", {"input-resolution": {"scale": 0.5}})
    x = torch.randn(2, 1, 16, 16)
    with torch.inference_mode():
        out = tiered(x, tier="free")
    assert out.shape == (2, 3, 16, 16)
    assert tier_flops(tiered, x[:1], "free") < 0.3 * tier_flops(tiered, x[:1], None)
    with pytest.raises(ValueError, match="scale must lie"):
        tiered.set_setting("free", "input-resolution", {"scale": 1.5})


def test_mixed_batch_with_compute_tiers_equals_per_tier_runs(trained_weights, digits8):
    tiered = obfuscate(
        trained("resnet", trained_weights),
        tiers="free=0.4,pro=0.7,premium=full",
        compute=EVERY,
        key=KEY,
        strategy="feature-mix",
    )
    calibrate(tiered, digits8["calibration"], progress=False)
    x = digits8["test"].images[:12]
    tiers = ["free", "premium", "pro"] * 4
    with torch.inference_mode():
        mixed = tiered(x, tiers=tiers)
        for name in ("free", "pro", "premium"):
            rows = [i for i, t in enumerate(tiers) if t == name]
            torch.testing.assert_close(mixed[rows], tiered(x[rows], tier=name))


def test_calibration_picks_a_cheaper_setting_and_hits_the_target(trained_weights, digits8):
    tiered = obfuscate(
        trained("resnet", trained_weights),
        tiers="free=0.5,premium=full",
        compute=EVERY,
        key=KEY,
        strategy="feature-mix",
    )
    report = calibrate(tiered, digits8["calibration"], digits8["test"], progress=False)
    jsonschema.validate(report, schema())
    free = report["tiers"][0]
    assert free["relative_cost"] < 0.9
    assert abs(free["achieved"]["calibration"] - 0.5) <= 4 / report["splits"]["calibration"]
    # the compute setting keeps utility a standard error above the target: the mix lands it
    assert "feature-mix" in free["strategy"] and free["params"]["feature-mix"]["strength"] > 0
    assert any(name in free["strategy"] for name in tiered.compute)
    assert free["extra"]["latency_ms"] > 0 and report["tiers"][1]["extra"]["latency_ms"] > 0
    json.dumps(report)  # params (settings) are plain JSON


def test_budget_and_target_conflict_is_a_clear_error(trained_weights, digits8):
    tiered = obfuscate(
        trained("resnet", trained_weights),
        tiers="free=0.9@0.1,premium=full",
        compute=EVERY,
        key=KEY,
        strategy="feature-mix",
    )
    with pytest.raises(CalibrationError, match=r"budget max_cost=0.1 conflict"):
        calibrate(tiered, digits8["calibration"], progress=False)
    no_compute = obfuscate(
        trained("resnet", trained_weights),
        tiers="free=0.5@0.5,premium=full",
        key=KEY,
        strategy="feature-mix",
    )
    with pytest.raises(CalibrationError, match="no compute strategy"):
        calibrate(no_compute, digits8["calibration"], progress=False)


def test_budget_is_met_when_possible(trained_weights, digits8):
    tiered = obfuscate(
        trained("resnet", trained_weights),
        tiers="free=0.3@0.7,premium=full",
        compute=EVERY,
        key=KEY,
        strategy="feature-mix",
    )
    report = calibrate(tiered, digits8["calibration"], digits8["test"], progress=False)
    assert report["tiers"][0]["relative_cost"] <= 0.7
    assert report["tiers"][0]["max_cost"] == 0.7


def test_save_load_with_compute_reproduces_outputs(tmp_path, trained_weights, digits8):
    tiered = obfuscate(
        trained("resnet", trained_weights),
        tiers="free=0.5,premium=full",
        compute=EVERY,
        key=KEY,
        strategy="feature-mix",
    )
    calibrate(tiered, digits8["calibration"], progress=False)
    tiered.save_pretrained(str(tmp_path / "art"))
    loaded = TieredModel.from_pretrained(str(tmp_path / "art"), trained("resnet", trained_weights))
    x = digits8["test"].images[:16]
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x, tier="free"), tiered(x, tier="free"))
        torch.testing.assert_close(loaded(x, tier="premium"), tiered(x, tier="premium"))
    assert loaded.tiers["free"].params == tiered.tiers["free"].params


def test_unload_restores_layers_and_blocks():
    model = two_block_resnet()
    before = {name: module for name, module in model.named_modules()}
    tiered = obfuscate(
        model, tiers="free=0.5,premium=full", compute=EVERY, key=KEY, strategy="feature-mix"
    )
    assert any(isinstance(m, TieredBlock) for m in model.modules())
    restored = tiered.unload()
    assert {name: module for name, module in restored.named_modules()} == before


def test_compute_options_are_validated():
    with pytest.raises(ValueError, match="compute strategy: pass it as compute="):
        obfuscate(two_block_resnet(), strategy="block-skip")
    with pytest.raises(ValueError, match="not a compute strategy"):
        obfuscate(two_block_resnet(), compute="feature-mix", strategy="feature-mix")
    with pytest.raises(ValueError, match="found no skippable residual blocks"):
        obfuscate(
            nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)),
            compute="block-skip",
            strategy="feature-mix",
        )
    assert parse_tiers("free=60%@0.5,premium=full")[0].max_cost == 0.5
    with pytest.raises(ValueError, match="bad cost budget"):
        parse_tiers("free=60%@cheap,premium=full")


def test_auto_slims_channels_only_where_no_block_can_be_skipped():
    assert resolve_compute(two_block_resnet(), "auto") == ["block-skip", "input-resolution"]
    stack = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
    )
    model = nn.Sequential(stack, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    assert resolve_compute(model, "auto") == ["channel-slim", "input-resolution"]
