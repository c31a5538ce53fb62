"""Cost accounting: FLOPs per input with ``torch.utils.flop_counter``."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from nnobfuscator.model import TieredModel


@torch.inference_mode()
def tier_flops(model: TieredModel, sample: torch.Tensor, tier: str | None) -> int:
    """FLOPs of one forward of ``sample`` (a batch of one) at ``tier`` (``None``: untouched)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model.forward_tier(sample, tier)
    return int(counter.get_total_flops())


def relative_costs(model: TieredModel, sample: torch.Tensor) -> dict[str, float]:
    """FLOPs of each tier divided by the untouched model's, measured on one input."""
    sample = sample[:1]
    full = max(tier_flops(model, sample, None), 1)
    return {
        name: (1.0 if tier.is_full else tier_flops(model, sample, name) / full)
        for name, tier in model.tiers.items()
    }
