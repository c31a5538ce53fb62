"""BatchNorm statistics re-estimated per compute setting: used at that tier only, exact, saved."""

from __future__ import annotations

import pytest
import torch
from test_compute import EVERY, KEY, two_block_resnet
from torch import nn

from nnobfuscator import TieredModel, calibrate, obfuscate
from nnobfuscator.calibration.compute_search import ComputeSearch
from nnobfuscator.calibration.runner import SettingRunner
from nnobfuscator.core.data import Split
from nnobfuscator.strategies.bn_reestimate import TieredNorm, find_store
from nnobfuscator.tasks import get_task
from nnobfuscator.zoo.digits import digits_splits
from nnobfuscator.zoo.training import train_classifier


@pytest.fixture(scope="module")
def digits():
    return digits_splits(image_size=8)


@pytest.fixture(scope="module")
def weights(digits) -> dict[str, torch.Tensor]:
    """A two-block-per-stage ResNet trained for a few seconds on 8x8 digits."""
    model = two_block_resnet()
    torch.manual_seed(0)
    train_classifier(model, digits["train"], epochs=1, lr=3e-3, optimizer="adamw", progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def head(split: Split, n: int) -> Split:
    """The first ``n`` samples (keeps the calibrations in these tests to seconds)."""
    return Split(split.name, split.images[:n], split.labels[:n])


def fresh(weights: dict[str, torch.Tensor]) -> nn.Module:
    model = two_block_resnet()
    model.load_state_dict(weights)
    return model.eval()


def tiered_with(weights, settings: dict[str, dict]) -> TieredModel:
    tiered = obfuscate(
        fresh(weights),
        tiers="free=0.5,premium=full",
        compute=EVERY,
        key=KEY,
        strategy="feature-mix",
    )
    tiered.set_strength("free", "feature-mix", 0.0)
    for name, strategy in tiered.compute.items():
        tiered.set_setting("free", name, settings.get(name, strategy.default_setting()))
    return tiered


SKIP = {"block-skip": {"skip": ["layer1.0", "layer1.1", "layer2.1"]}}
SLIM = {"channel-slim": {"keep": {"layer1": 0.25, "layer2": 0.25}}}


def measure(tiered: TieredModel, inputs: torch.Tensor, changes: dict) -> tuple:
    runner = SettingRunner(tiered, inputs, batch_size=len(inputs))
    return runner.measure("free", runner.signatures(changes))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def test_full_tier_is_bit_exact_and_norms_are_wrapped_by_type(weights, digits):
    x = digits["test"].images[:32]
    with torch.inference_mode():
        plain = fresh(weights)(x)
    tiered = tiered_with(weights, SKIP)
    norms = [m for m in tiered.base_model.modules() if isinstance(m, TieredNorm)]
    assert len(norms) == sum(isinstance(m, nn.BatchNorm2d) for m in two_block_resnet().modules())
    cal = digits["calibration"]
    _, stats = measure(tiered, cal.images, {"layer1.0": "skip"})
    find_store(tiered.host).install("free", stats)
    with torch.inference_mode():
        assert torch.equal(tiered(x, tier="premium"), plain)
        assert torch.equal(tiered.forward_tier(x, None), plain)
    assert torch.equal(tiered.unload()(x), plain)


@pytest.mark.parametrize("settings", [SKIP, SLIM], ids=["skip", "slim"])
def test_reestimated_stats_change_the_tier_and_raise_its_metric(weights, digits, settings):
    cal, test = digits["calibration"], digits["test"]
    tiered = tiered_with(weights, settings)
    changes = {}
    for name, strategy in tiered.compute.items():
        changes.update(strategy.changes(tiered.compute[name].setting("free")))
    logits, stats = measure(tiered, cal.images, changes)
    assert stats and all(name in find_store(tiered.host).norms for name in stats)
    assert "bn1" not in stats  # upstream of every change: the user's statistics are kept
    with torch.inference_mode():
        before = tiered(test.images, tier="free")
        find_store(tiered.host).install("free", stats)
        after = tiered(test.images, tier="free")
        # eval mode with the measured statistics reproduces the measuring pass exactly
        torch.testing.assert_close(tiered(cal.images, tier="free"), logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
    assert accuracy(after, test.labels) > accuracy(before, test.labels) + 0.05


def test_stats_follow_the_setting_they_were_measured_for(weights, digits):
    tiered = tiered_with(weights, SKIP)
    _, stats = measure(tiered, digits["calibration"].images, {"layer1.0": "skip"})
    store = find_store(tiered.host)
    store.install("free", stats)
    assert store.stats("free")
    tiered.set_setting("free", "block-skip", {"skip": ["layer2.1"]})
    assert store.stats("free") == {}  # measured for another setting: not used


def test_calibration_with_compute_saves_and_loads_identically(tmp_path, weights, digits):
    tiered = obfuscate(
        fresh(weights),
        tiers="free=75%,premium=full",
        compute=EVERY,
        key=KEY,
        strategy="feature-mix",
    )
    cal, test = head(digits["calibration"], 160), head(digits["test"], 256)
    report = calibrate(tiered, cal, test, progress=False, batch_size=80)
    free = report["tiers"][0]
    assert free["relative_cost"] < 0.6
    gap = free["extra"]
    assert abs(gap["target_gap"]) <= max(gap["two_se"], 0.025)
    assert find_store(tiered.host).stats("free")
    tiered.save_pretrained(tmp_path / "art")
    loaded = TieredModel.from_pretrained(tmp_path / "art", fresh(weights))
    x = digits["test"].images[:64]
    with torch.inference_mode():
        assert torch.equal(loaded(x, tier="free"), tiered(x, tier="free"))
        assert torch.equal(loaded(x, tier="premium"), tiered(x, tier="premium"))


def test_search_reuses_work(weights, digits):
    tiered = tiered_with(weights, {})
    cal = head(digits["calibration"], 160)
    task = get_task("classification")
    runner = SettingRunner(tiered, cal.images, task.read, 80)
    search = ComputeSearch(tiered, runner, cal.labels, task)
    base = search.evaluate("free", search.start()).utility
    stage_samples = runner.stage_samples
    point = search.cheapest("free", base - 0.1)
    assert point.cost < 0.7 and point.utility >= base - 0.1
    counts = search.counts
    assert counts.pruned + counts.screened + counts.memo_hits > 0
    # the work done is less than one full pass per evaluated candidate
    passes = (runner.stage_samples - stage_samples) / (len(cal) * len(runner.stages))
    assert passes < counts.evaluated + counts.screened
