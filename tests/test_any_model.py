"""One invariant matrix: every torchvision family (smallest builder, random weights) and every
segmentation builder, times the degrading strategies, plus compute tiers where they apply."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from invariants import check_invariants
from torch import nn

from nnobfuscator import InputSpec, TieredModel, obfuscate, read_output
from nnobfuscator.tiered.cost import tier_flops
from nnobfuscator.zoo.families import Family, all_families

KEY = bytes(range(32))
STRATEGIES = {"feature-mix": 0.5, "weight-noise": 1.0, "logit-noise": 1.0}
LARGE = 40_000_000  # parameters; larger models run under the slow marker
FAMILIES = all_families()


def _marks(family: Family) -> list:
    return [pytest.mark.slow] if family.params > LARGE or family.input_size > 100 else []


def fresh(family: Family) -> nn.Module:
    """A new instance with the family's random weights (the same each time)."""
    model = family.build()
    model.load_state_dict(_weights(family.builder))
    return model.eval()


@functools.cache
def _weights(builder: str) -> dict[str, torch.Tensor]:
    family = next(f for f in FAMILIES if f.builder == builder)
    return copy.deepcopy(family.build().state_dict())  # keeps the version metadata (MNASNet)


def tiered_model(family: Family, strategy: str, compute: str | None = None) -> TieredModel:
    size = family.input_size
    tiered = obfuscate(
        fresh(family),
        tiers="free=0.5,pro=0.8,premium=full",
        strategy=strategy,
        compute=compute,
        key=KEY,
        task=family.task,
        input_spec=InputSpec(3, size, size),
    )
    for tier, share in (("free", 1.0), ("pro", 0.5)):
        tiered.set_strength(tier, strategy, share * STRATEGIES[strategy])
    for name, compute_strategy in tiered.compute.items():
        for tier in ("free", "pro"):
            tiered.set_setting(tier, name, compute_strategy.default_setting())
    return tiered


def assert_same(a, b, exact: bool = False) -> None:
    a, b = read_output(a), read_output(b)
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def assert_mixed_batch_equals_per_tier_runs(tiered: TieredModel, x: torch.Tensor) -> None:
    names = ["free", "premium", "pro", "free"]
    mixed = read_output(tiered(x, tiers=names))
    for tier in set(names):
        rows = [i for i, name in enumerate(names) if name == tier]
        assert_same(mixed[rows], tiered(x[rows], tier=tier))


CASES = [
    pytest.param(family, strategy, id=f"{family.builder}-{strategy}", marks=_marks(family))
    for family in FAMILIES
    for strategy in STRATEGIES
]


@pytest.mark.parametrize(("family", "strategy"), CASES)
def test_invariants(family: Family, strategy: str, tmp_path):
    x = family.example(4)
    with torch.inference_mode():
        expected = fresh(family)(x)
    tiered = tiered_model(family, strategy)
    assert tiered.strategies[strategy].layers or strategy == "logit-noise"
    with pytest.raises(ValueError, match="expected input of shape"):
        tiered(x[:, :1], tier="free")
    check_invariants(
        tiered, x, expected_full=expected, rebuild=lambda: fresh(family), tmp_path=tmp_path
    )


COMPUTE_CASES = [
    pytest.param(family, id=family.builder, marks=_marks(family)) for family in FAMILIES
]


@pytest.mark.parametrize("family", COMPUTE_CASES)
@torch.inference_mode()
def test_compute_tiers_where_they_apply(family: Family):
    x = family.example(4)
    expected = fresh(family)(x)
    tiered = tiered_model(family, "feature-mix", compute="auto")
    structural = {n: s for n, s in tiered.compute.items() if n != "input-resolution"}
    if not structural:
        pytest.skip(f"{family.builder}: no skippable or slimmable blocks")
    for name, strategy in structural.items():
        tiered.set_setting("free", name, strategy.cheaper(strategy.default_setting())[-1])
    assert_same(tiered(x, tier="premium"), expected, exact=True)
    assert_mixed_batch_equals_per_tier_runs(tiered, x)
    sample = x[:1]
    assert tier_flops(tiered, sample, "free") < tier_flops(tiered, sample, "pro")
    restored = tiered.unload()
    assert_same(restored(x), expected, exact=True)
