"""The invariants every tiered model keeps, checked in one place.

Every model family, task and strategy runs :func:`check_invariants` (``test_any_model``,
``test_withholding``, ``test_segmentation``, ``test_text_model``): the full tier is the untouched
model bit for bit, a lower tier changes the output and gives the same output for the same input,
a mixed batch equals per-tier runs, save -> load gives identical outputs, bad calls fail with a
message that says what to do, and unload gives back the original model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nnobfuscator import TieredModel, read_output
from nnobfuscator.core.outputs import select


def plain_call(module: nn.Module, x: Any) -> Any:
    """Call a plain model on a batch (a dict of tensors goes in as keyword arguments)."""
    return module(**x) if isinstance(x, Mapping) else module(x)


def batch_size(x: Any) -> int:
    return len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)


@torch.inference_mode()
def check_invariants(
    tiered: TieredModel,
    x: Any,
    *,
    expected_full: Any,
    rebuild: Callable[[], nn.Module] | None,
    tmp_path: Path,
    low: str = "free",
    key: bytes | None = None,
    changes: bool = True,
    unload: bool = True,
) -> None:
    """Assert the invariants on ``tiered`` for the batch ``x`` (at least two samples).

    Args:
        expected_full: the plain model's output on ``x``.
        rebuild: a fresh instance of the same trained model (save -> load), or ``None`` to skip.
        low: a tier below full that must change the output (when ``changes``).
        key: the secret key to load with (when it is not in this machine's key ring).
        unload: also unload (last: the tiered model is unusable afterwards).
    """
    expected = read_output(expected_full)
    outputs = {tier: read_output(tiered(x, tier=tier)) for tier in tiered.tier_names}
    full = next(name for name in tiered.tier_names if tiered.get_tier(name).is_full)
    # the full tier is the untouched model, bit for bit
    assert torch.equal(outputs[full], expected)
    lower = outputs[low]
    if changes:
        assert (lower - expected).norm() > 1e-3 * expected.norm()
    # the same input gives the same output
    assert torch.equal(read_output(tiered(x, tier=low)), lower)
    # a mixed batch equals each tier run alone
    n = batch_size(x)
    names = [tiered.tier_names[(i * 2 + 1) % len(tiered.tier_names)] for i in range(n)]
    names[0] = low
    mixed = read_output(tiered(x, tiers=names))
    for tier in set(names):
        rows = torch.tensor([i for i, name in enumerate(names) if name == tier])
        alone = read_output(tiered(select(x, rows), tier=tier))
        torch.testing.assert_close(mixed[rows], alone, rtol=1e-4, atol=1e-4)
    # save -> load gives identical outputs at every tier
    if rebuild is not None:
        tiered.save_pretrained(tmp_path / "invariants")
        loaded = TieredModel.from_pretrained(tmp_path / "invariants", rebuild(), key=key)
        for tier in tiered.tier_names:
            assert torch.equal(read_output(loaded(x, tier=tier)), outputs[tier])
        assert loaded.tiers[low].params == tiered.tiers[low].params
    # errors say what was wrong
    with pytest.raises(ValueError, match="unknown tier 'gold'"):
        tiered(x, tier="gold")
    with pytest.raises(ValueError, match="one tier name per sample"):
        tiered(x, tiers=[low])
    # unload gives the original model back, untouched
    if unload:
        base = tiered.base_model
        restored = tiered.unload()
        assert restored is base
        assert not any(getattr(m, "nnobf_wrapper", False) for m in restored.modules())
        assert torch.equal(read_output(plain_call(restored, x)), expected)
