"""Cost accounting: FLOPs per input with ``torch.utils.flop_counter``, and measured latency."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from nnobfuscator.tiered.model import TieredModel


@torch.inference_mode()
def tier_flops(model: TieredModel, sample: Any, tier: str | None) -> int:
    """FLOPs of one forward of ``sample`` (a batch of one) at ``tier`` (``None``: untouched)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model.forward_tier(sample, tier)
    return int(counter.get_total_flops())


def relative_costs(model: TieredModel, sample: Any) -> dict[str, float]:
    """FLOPs of each tier divided by the untouched model's, measured on one input."""
    full = max(tier_flops(model, sample, None), 1)
    return {
        name: (1.0 if tier.is_full else tier_flops(model, sample, name) / full)
        for name, tier in model.tiers.items()
    }


@torch.inference_mode()
def tier_latency_ms(model: TieredModel, batch: Any, repeats: int = 5) -> dict[str, float]:
    """Median wall time of one forward of ``batch`` at each tier, in milliseconds.

    Tiers are timed in interleaved rounds so that machine load drifts affect them alike.
    """
    names = list(model.tiers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats + 1):
        for name in names:
            started = time.perf_counter()
            model.forward_tier(batch, name)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if round_index:  # the first round warms up caches
                times[name].append(1000 * (time.perf_counter() - started))
    return {name: round(statistics.median(values), 3) for name, values in times.items()}
