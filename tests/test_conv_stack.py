"""Channel slimming of plain conv stacks (VGG-like ``features``): smaller convolutions, exact."""

from __future__ import annotations

import pytest
import torch
from test_compute import KEY
from torch import nn

from nnobfuscator import TieredModel, calibrate, obfuscate
from nnobfuscator.calibration.runner import SettingRunner
from nnobfuscator.strategies import TieredBlock
from nnobfuscator.strategies.bn_reestimate import find_store
from nnobfuscator.strategies.conv_stack import ConvStackSlimmer
from nnobfuscator.strategies.slimming import slimmer_for
from nnobfuscator.tiered.cost import tier_flops
from nnobfuscator.zoo.digits import digits_splits
from nnobfuscator.zoo.training import train_classifier


def tiny_vgg() -> nn.Module:
    """Two resolutions of conv-BN-ReLU pairs, a pool, a linear head (VGG's layout, small)."""
    torch.manual_seed(0)

    def unit(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    features = nn.Sequential(
        *unit(1, 16), *unit(16, 16), nn.MaxPool2d(2), *unit(16, 32), *unit(32, 32), nn.MaxPool2d(2)
    )
    for module in features.modules():  # non-trivial BN statistics, as after training
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


KEEP = {"0@0": 0.5, "0@1": 0.25}


def slimmed(model: nn.Module, keep: dict[str, float] = KEEP) -> TieredModel:
    tiered = obfuscate(
        model,
        tiers="free=0.5,pro=0.7,premium=full",
        compute="auto",
        key=KEY,
        strategy="feature-mix",
    )
    for tier in ("free", "pro"):
        tiered.set_strength(tier, "feature-mix", 0.0)
        tiered.set_setting(tier, "input-resolution", {"scale": 1.0})
    tiered.set_setting("free", "channel-slim", {"keep": keep})
    tiered.set_setting("pro", "channel-slim", {"keep": {"0@1": 0.5}})
    return tiered


def test_conv_stacks_are_found_by_structure():
    model = tiny_vgg()
    slimmer = slimmer_for(model[0])
    assert isinstance(slimmer, ConvStackSlimmer)
    assert slimmer.space_groups() == [0, 0, 1]  # spaces produced by convs 0, 1 | 2
    assert slimmer_for(model) is None  # the whole model is no plain stack
    assert slimmer_for(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())) is None  # one conv
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    assert slimmer_for(depthwise) is None
    tiered = slimmed(tiny_vgg())
    assert set(tiered.compute) == {"channel-slim", "input-resolution"}
    assert tiered.compute["channel-slim"].stages == ["0@0", "0@1"]
    assert isinstance(tiered.base_model.get_submodule("0"), TieredBlock)


def test_slimmed_stack_runs_fewer_flops_and_equals_a_mean_filled_reference():
    model = tiny_vgg()
    plain = tiny_vgg()
    tiered = slimmed(model)
    block = tiered.base_model.get_submodule("0")
    slimmer = block.slimmer
    assert isinstance(slimmer, ConvStackSlimmer)
    torch.manual_seed(1)
    batches = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    tiered.compute["channel-slim"].fit(lambda b: tiered.forward_tier(b, None), batches)
    assert slimmer.stats is not None and len(slimmer.stats) == 3
    x = torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        slim = tiered(x, tier="free")
    # Reference: the untouched stack with the dropped channels at their mean where read.
    _, dropped = slimmer.split((0.5, 0.5, 0.25), torch.device("cpu"))
    convs = [m for m in plain[0] if isinstance(m, nn.Conv2d)]
    handles = []
    for space, conv in enumerate(convs[1:]):
        mean = slimmer.stats[space][0]

        def fill(module, args, d=dropped[space], mean=mean):
            (a,) = args
            a = a.clone()
            a[:, d] = mean[d].view(1, -1, 1, 1)
            return (a,)

        assert len(dropped[space]) > 0
        handles.append(conv.register_forward_pre_hook(fill))
    with torch.inference_mode():
        reference = plain(x)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(slim, reference, rtol=1e-4, atol=1e-4)
    full = tier_flops(tiered, x[:1], None)
    assert tier_flops(tiered, x[:1], "free") < 0.7 * full
    assert tier_flops(tiered, x[:1], "free") < tier_flops(tiered, x[:1], "pro") < full


def test_full_tier_is_bit_exact_and_mixed_batch_equals_per_tier_runs():
    tiered = slimmed(tiny_vgg())
    plain = tiny_vgg()
    x = torch.randn(12, 1, 8, 8)
    tiers = ["free", "premium", "pro"] * 4
    with torch.inference_mode():
        assert torch.equal(tiered(x, tier="premium"), plain(x))
        mixed = tiered(x, tiers=tiers)
        for name in ("free", "pro", "premium"):
            rows = [i for i, t in enumerate(tiers) if t == name]
            torch.testing.assert_close(mixed[rows], tiered(x[rows], tier=name))
    assert torch.equal(tiered.unload()(x), plain(x))


def test_reestimated_statistics_apply_inside_the_slimmed_stack():
    tiered = slimmed(tiny_vgg())
    cal = torch.randn(32, 1, 8, 8)
    runner = SettingRunner(tiered, cal, batch_size=32)
    changes = tiered.compute["channel-slim"].changes(tiered.compute["channel-slim"].setting("free"))
    assert changes == {"0": [0.5, 0.25]}
    logits, stats = runner.measure("free", runner.signatures(changes))
    assert stats and all(name.startswith("0.") for name in stats)
    find_store(tiered.host).install("free", stats)
    with torch.inference_mode():
        torch.testing.assert_close(tiered(cal, tier="free"), logits, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def digits():
    return digits_splits(image_size=8)


def test_calibration_gives_a_conv_stack_a_cheaper_tier(digits):
    model = tiny_vgg().train()
    torch.manual_seed(0)
    train_classifier(model, digits["train"], epochs=2, lr=3e-3, optimizer="adamw", progress=False)
    tiered = obfuscate(
        model.eval(), tiers="free=70%,premium=full", compute="auto", key=KEY, strategy="feature-mix"
    )
    report = calibrate(tiered, digits["calibration"], digits["test"], progress=False)
    free = report["tiers"][0]
    assert free["relative_cost"] < 0.6
    assert tiered.get_tier("free").params["channel-slim"]["keep"]
