"""One copy of the weights, one forward pass per mixed batch (issue 12, items 1 and 2)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, tiny_resnet
from torch import nn
from torchvision.models import resnet18

from nnobfuscator import TieredModel, obfuscate
from nnobfuscator.core.tier_pass import DerivedCache
from nnobfuscator.core.tiers import parse_tiers
from nnobfuscator.core.wrapping import TieredLayer

KEY = bytes(range(32))


def _tiered(builder=tiny_resnet, tiers="free=60%,pro=85%,premium=full", **options) -> TieredModel:
    tiered = obfuscate(builder(), tiers=tiers, key=KEY, **{"strategy": "feature-mix", **options})
    names = [t for t in tiered.tier_names if not tiered.get_tier(t).is_full]
    for index, tier in enumerate(names):
        tiered.set_strength(tier, "feature-mix", 0.9 - 0.8 * index / max(1, len(names)))
    return tiered


def _count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


@torch.inference_mode()
@pytest.mark.parametrize("name", list(BUILDERS))
def test_activation_mixing_equals_the_mix_folded_into_the_weights(name, digits8, monkeypatch):
    monkeypatch.setattr(TieredLayer, "FOLD_ABOVE", float("inf"))  # narrow layers act on inputs too
    tiered = _tiered(BUILDERS[name])
    x = digits8["test"].images[:8]
    served = tiered(x, tier="free")
    layers = [m for m in tiered.base_model.modules() if isinstance(m, TieredLayer)]
    folded = {layer: layer.tier_weight("free", fold_all=True) for layer in layers}
    assert all(weight is not None for weight in folded.values())
    with tiered.disable_tiers():
        originals = {layer: layer.base_layer.weight.data.clone() for layer in layers}
        for layer, weight in folded.items():
            layer.base_layer.weight.data.copy_(weight)
        refolded = tiered(x)
        for layer, weight in originals.items():
            layer.base_layer.weight.data.copy_(weight)
    torch.testing.assert_close(served, refolded, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(served, tiered(x, tier="premium"))


def test_narrow_layers_fold_the_mix_at_one_tier_and_wide_ones_act_on_inputs():
    tiered = _tiered(lambda: resnet18(num_classes=10))
    layers = {n: m for n, m in tiered.base_model.named_modules() if isinstance(m, TieredLayer)}
    folded = {n.replace(".base_layer", "") for n, m in layers.items() if m.folding_is_cheaper}
    assert "layer2.0.downsample.0" in folded  # 1x1 stride 2: mixing would cost 100% of it
    assert "layer4.1.conv2" not in folded  # 3x3, 512 wide: mixing costs 32 / (512 * 9)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        tiered(x, tier="free")
    memory = tiered.memory_bytes()
    assert 0 < memory["caches"] <= tiered.host.cache.budget


@torch.inference_mode()
def test_a_mixed_batch_runs_in_one_pass_and_equals_per_tier_runs(digits8):
    tiered = _tiered()
    x = digits8["test"].images[:12]
    tiers = ["free", "pro", "premium"] * 4
    calls = _count_forwards(tiered.base_model)
    tiered(x, tiers=tiers)  # the first mixed batch is checked against one pass per tier
    assert tiered.executor.one_pass is True
    calls[0] = 0
    mixed = tiered(x, tiers=tiers)
    assert calls[0] == 1
    for tier in ("free", "pro", "premium"):
        rows = torch.tensor([i for i, t in enumerate(tiers) if t == tier])
        torch.testing.assert_close(mixed[rows], tiered(x[rows], tier=tier), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_compute_tiers_group_by_input_size_and_share_a_pass_across_skipped_blocks(digits8):
    tiered = _tiered(
        tiers="free=60%,pro=70%,plus=85%,premium=full", compute="block-skip+input-resolution"
    )
    skippable = sorted(tiered.compute["block-skip"].layers)
    for tier, skip, scale in (
        ("free", skippable[:2], 0.75),
        ("pro", skippable[:1], 0.75),
        ("plus", skippable[:1], 1.0),
    ):
        tiered.set_setting(tier, "block-skip", {"skip": skip})
        tiered.set_setting(tier, "input-resolution", {"scale": scale})
    x = digits8["test"].images[:16]
    tiers = ["free", "pro", "plus", "premium"] * 4
    keys = {t: tiered.executor.pass_key(t) for t in set(tiers)}
    assert keys["free"] == keys["pro"] != keys["plus"] == keys["premium"]
    tiered(x, tiers=tiers)
    calls = _count_forwards(tiered.base_model)
    mixed = tiered(x, tiers=tiers)
    assert calls[0] == 2  # two input sizes, two passes; skipped blocks are routed per row
    for tier in set(tiers):
        rows = torch.tensor([i for i, t in enumerate(tiers) if t == tier])
        torch.testing.assert_close(mixed[rows], tiered(x[rows], tier=tier), rtol=1e-5, atol=1e-5)


class ReadsWeight(nn.Module):
    """Reads a child layer's weight directly (as Swin's attention does), bypassing its call."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(F.conv2d(x, self.mid.weight, self.mid.bias, padding=1))
        return self.head(x.mean((2, 3)))


@torch.inference_mode()
def test_a_model_that_reads_weights_directly_falls_back_to_one_pass_per_tier(digits8):
    torch.manual_seed(0)
    tiered = _tiered(ReadsWeight, targets=["mid"])
    x = digits8["test"].images[:6]
    tiers = ["free", "premium", "pro"] * 2
    mixed = tiered(x, tiers=tiers)
    assert tiered.executor.one_pass is False
    for tier in set(tiers):
        rows = torch.tensor([i for i, t in enumerate(tiers) if t == tier])
        torch.testing.assert_close(mixed[rows], tiered(x[rows], tier=tier), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tiered(x, tier="free"), tiered(x, tier="premium"))


@torch.inference_mode()
@pytest.mark.parametrize("count", [3, 10])
def test_memory_stays_near_one_model_however_many_tiers(count):
    names = [f"t{i}" for i in range(count - 1)]
    spec = ",".join(f"{n}={0.3 + 0.05 * i:.2f}" for i, n in enumerate(names)) + ",top=full"
    tiered = _tiered(
        lambda: resnet18(num_classes=10),
        tiers=spec,
        compute="block-skip+channel-slim+input-resolution",
    )
    blocks = sorted(tiered.compute["block-skip"].layers)
    stages = tiered.compute["channel-slim"].stages
    for i, name in enumerate(names):  # every tier its own compute setting
        for strategy_name, strategy in tiered.compute.items():
            tiered.set_setting(name, strategy_name, strategy.default_setting())
        tiered.set_setting(name, "block-skip", {"skip": blocks[: 1 + i % len(blocks)]})
        keep = (0.5, 0.25, 0.125)[i % 3]
        tiered.set_setting(name, "channel-slim", {"keep": {stages[i % len(stages)]: keep}})
    x = torch.randn(2, 3, 32, 32)
    for tier in tiered.tier_names:
        tiered(x, tier=tier)
    memory = tiered.memory_bytes()
    assert memory["total"] == memory["model"] + memory["keyed"] + memory["caches"]
    assert memory["caches"] <= tiered.host.cache.budget
    assert memory["total"] <= (1.05 if count == 3 else 1.10) * memory["model"]


def test_the_derived_cache_keeps_its_budget_and_recomputes_on_a_miss():
    cache = DerivedCache(3 * 4 * 100)
    made = []

    def make(i):
        made.append(i)
        return torch.full((100,), float(i))

    for i in range(5):
        assert cache.get(i, lambda i=i: make(i))[0] == i
    assert cache.nbytes <= cache.budget and len(made) == 5
    cache.get(4, lambda: make(99))  # recent: a hit
    assert made[-1] == 4
    assert cache.get(0, lambda: make(0))[0] == 0 and made[-1] == 0  # evicted: made again
    assert cache.get("big", lambda: torch.zeros(1000)).numel() == 1000  # too big: not kept
    assert cache.nbytes <= cache.budget


@torch.inference_mode()
def test_artifacts_of_the_256_feature_mix_still_load(tmp_path, digits8):
    legacy = TieredModel(
        tiny_resnet(),
        parse_tiers("free=60%,premium=full"),
        [{"name": "feature-mix", "targets": None, "block": 256, "permute": True}],
        KEY,
    )
    legacy.set_strength("free", "feature-mix", 0.7)
    x = digits8["test"].images[:4]
    expected = legacy(x, tier="free")
    legacy.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for saved in config["strategies"]:
        saved.pop("block"), saved.pop("permute")  # as 0.3 wrote it
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = TieredModel.from_pretrained(tmp_path, tiny_resnet())
    assert (
        loaded.strategies["feature-mix"].block == 256 and loaded.strategies["feature-mix"].permute
    )
    torch.testing.assert_close(loaded(x, tier="free"), expected)


@torch.inference_mode()
def test_outputs_do_not_depend_on_what_the_cache_holds():
    tiered = _tiered(lambda: resnet18(num_classes=10), tiers="free=50%,pro=70%,premium=full")
    x = torch.randn(2, 3, 32, 32)
    first = tiered(x, tier="free")
    for tier in tiered.tier_names:  # other tiers' entries now compete for the cache
        tiered(x, tier=tier)
    tiered.host.cache._entries.clear()
    tiered.host.cache.nbytes = 0
    assert torch.equal(tiered(x, tier="free"), first)
