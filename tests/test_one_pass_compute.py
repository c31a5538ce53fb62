"""Per-sample routing: tiers that differ in the blocks they skip (and in their BatchNorm
statistics) share one forward pass; tiers at other input sizes or widths still do not."""

from __future__ import annotations

import pytest
import torch
from test_compute import two_block_resnet
from torch import nn

from nnobfuscator import TieredModel, obfuscate
from nnobfuscator.core.tier_pass import MixedPassUnsupported, TierContext
from nnobfuscator.core.tiers import parse_tiers
from nnobfuscator.core.wrapping import Host
from nnobfuscator.strategies.bn_reestimate import NormStore, find_store

KEY = bytes(range(32))
TIERS = ["free", "pro", "plus", "premium"]
SKIPS = {"free": ["layer1.0", "layer2.1"], "pro": ["layer1.1"], "plus": []}
MIX = {"free": 0.8, "pro": 0.5, "plus": 0.2}


def _tiered(compute: str = "block-skip") -> TieredModel:
    """Four tiers: three skip different blocks, mix features at different strengths and (but
    ``plus``) normalise with statistics of their own; ``premium`` is the untouched model."""
    tiered = obfuscate(
        two_block_resnet(),
        tiers="free=0.5,pro=0.7,plus=0.85,premium=full",
        compute=compute,
        key=KEY,
        strategy="feature-mix",
    )
    generator = torch.Generator().manual_seed(1)
    store = find_store(tiered.host)
    for tier, skip in SKIPS.items():
        tiered.set_strength(tier, "feature-mix", MIX[tier])
        for name, strategy in tiered.compute.items():
            tiered.set_setting(tier, name, strategy.default_setting())
        tiered.set_setting(tier, "block-skip", {"skip": skip})
        if tier != "plus":
            stats = {}
            for name, norm in store.norms.items():
                size = norm.base_layer.num_features
                mean = torch.rand(size, generator=generator) - 0.5
                stats[name] = (mean, torch.rand(size, generator=generator) + 0.5)
            store.install(tier, stats)
    return tiered


def _count_rows(module: nn.Module) -> list[int]:
    """Calls and samples seen by ``module`` (a forward pre-hook)."""
    seen = [0, 0]

    def hook(module: nn.Module, args: tuple) -> None:
        seen[0] += 1
        seen[1] += args[0].shape[0]

    module.register_forward_pre_hook(hook)
    return seen


def _assert_rows_match(tiered: TieredModel, x: torch.Tensor, tiers: list[str], mixed) -> None:
    for tier in set(tiers):
        rows = torch.tensor([i for i, t in enumerate(tiers) if t == tier])
        alone = tiered(x[rows], tier=tier)
        torch.testing.assert_close(mixed[rows], alone, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
@pytest.mark.parametrize("compute", ["block-skip", "block-skip+channel-slim"])
def test_tiers_that_skip_different_blocks_share_one_pass(digits8, compute):
    tiered = _tiered(compute)
    if "channel-slim" in compute:  # one width for every tier but premium's (it runs alone)
        for tier in SKIPS:
            tiered.set_setting(tier, "channel-slim", {"keep": {"layer2": 0.5}})
        find_store(tiered.host).clear("plus")
    keys = {tier: tiered.executor.pass_key(tier) for tier in TIERS}
    x = digits8["test"].images[:16]
    tiers = TIERS * 4
    tiered(x, tiers=tiers)  # the first mixed batch is checked against one pass per tier
    assert tiered.executor.one_pass is True
    stem = _count_rows(tiered.host.get("conv1"))
    mixed = tiered(x, tiers=tiers)
    assert stem[0] == len(set(keys.values())) == (1 if compute == "block-skip" else 2)
    _assert_rows_match(tiered, x, tiers, mixed)
    singles = [tiered(x[:4], tier=tier) for tier in TIERS]
    assert all(not torch.allclose(a, b) for a, b in zip(singles, singles[1:], strict=False))


@torch.inference_mode()
def test_rows_of_the_full_tier_equal_the_plain_model(digits8):
    tiered = _tiered()
    x = digits8["test"].images[:12]
    tiers = ["premium", "free", "pro"] * 4
    plain = two_block_resnet()(x)
    assert torch.equal(tiered(x, tier="premium"), plain)
    for _ in range(2):  # checked, then trusted
        mixed = tiered(x, tiers=tiers)
        rows = torch.tensor([i for i, t in enumerate(tiers) if t == "premium"])
        torch.testing.assert_close(mixed[rows], plain[rows], rtol=1e-4, atol=1e-4)
    assert tiered.executor.one_pass is True


@torch.inference_mode()
def test_a_skipped_block_never_sees_the_samples_that_skip_it(digits8):
    tiered = _tiered()
    x = digits8["test"].images[:12]
    tiers = ["free", "pro", "premium"] * 4
    tiered(x, tiers=tiers)
    seen = {name: _count_rows(tiered.host.get(f"{name}.conv1")) for name in SKIPS["free"]}
    seen["layer1.1"] = _count_rows(tiered.host.get("layer1.1.conv1"))
    tiered(x, tiers=tiers)
    assert seen["layer1.0"] == [1, 8] and seen["layer2.1"] == [1, 8]  # free skips both
    assert seen["layer1.1"] == [1, 8]  # pro skips it
    tiered(x, tiers=["free", "pro"] * 6)
    assert seen["layer1.1"] == [2, 14]  # free rows only
    assert seen["layer1.0"] == [2, 14]  # pro rows only


@torch.inference_mode()
def test_tiers_at_other_input_sizes_still_run_their_own_pass(digits8):
    tiered = _tiered("block-skip+input-resolution")
    tiered.set_setting("free", "input-resolution", {"scale": 0.75})
    keys = {tier: tiered.executor.pass_key(tier) for tier in TIERS}
    assert keys["free"] != keys["pro"] == keys["plus"] == keys["premium"]
    x = digits8["test"].images[:16]
    tiers = TIERS * 4
    tiered(x, tiers=tiers)
    assert tiered.executor.one_pass is True
    stem = _count_rows(tiered.host.get("conv1"))
    mixed = tiered(x, tiers=tiers)
    assert stem == [2, 16]
    _assert_rows_match(tiered, x, tiers, mixed)


@torch.inference_mode()
def test_blocks_of_different_widths_in_one_pass_fall_back_to_a_pass_per_tier(digits8):
    tiered = _tiered("block-skip+channel-slim")
    tiered.set_setting("free", "channel-slim", {"keep": {"layer2": 0.5}})
    tiered.executor.pass_key = lambda tier: ()  # as if every tier could share a pass
    x = digits8["test"].images[:12]
    tiers = ["free", "pro", "premium"] * 4
    block = tiered.host.wrappers["layer2.0"]
    with pytest.raises(MixedPassUnsupported), tiered.context.activate("free", tuple(tiers)):
        block(torch.zeros(12, 64, 4, 4))
    mixed = tiered(x, tiers=tiers)
    assert tiered.executor.one_pass is False
    _assert_rows_match(tiered, x, tiers, mixed)


@torch.inference_mode()
@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 5), (6, 4, 3, 3), (6, 4, 2, 3, 3)])
def test_each_sample_is_normalised_with_its_own_tiers_statistics(shape):
    norm = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    torch.manual_seed(0)
    root = nn.Sequential(norm(4)).eval()
    for tensor in (root[0].weight, root[0].bias, root[0].running_mean):
        tensor.uniform_(-1.0, 1.0)
    root[0].running_var.uniform_(0.5, 1.5)
    context = TierContext()
    host = Host(root, context, {tier.name: tier for tier in parse_tiers("a=0.5,b=0.7,c=full")})
    store = NormStore(host)
    for tier in ("a", "b"):
        store.install(tier, {"0": (torch.randn(4), torch.rand(4) + 0.5)})
    x = torch.randn(shape)
    rows = ("a", None, "b", "a", "b", None)
    with context.activate("a", rows):
        mixed = root(x)
    for i, tier in enumerate(rows):
        with context.activate(tier):
            alone = root(x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    plain = root(x)  # the user's statistics, as the untouched model's samples see them
    assert not torch.allclose(mixed[0], plain[0]) and torch.allclose(mixed[1], plain[1])
