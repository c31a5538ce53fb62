"""AIM noise: fresh, unkeyed logit noise on every call (the baseline of the AIM paper, WWW 2025).

At strength ``s`` each sample's logits get ``s * std(logits) * n`` with ``n`` drawn anew from the
global random generator on every call, so the same query gets a different answer each time. It is
here to be measured against, not served (``weak``): repeating a query and voting averages the
noise away. On the demo ResNet-18 (digits, ``free=60%,pro=85%,premium=full``, 21 queries per
input, ``nnobf attack``) a majority vote lifted the free tier from 57.9% to 96.4% and pro from
80.8% to 97.3% (full model: 98.7%); with compute saving on, where the noise only trims what
skipped blocks leave, from 60.6% to 69.5% and from 83.5% to 87.1%. Keyed ``logit-noise`` gains
0 points (``benchmarks/RESULTS.md``, "Attacks on served tiers").
"""

from __future__ import annotations

from typing import Any

import torch

from nnobfuscator.core.outputs import map_output
from nnobfuscator.strategies.base import Strategy, register_strategy
from nnobfuscator.strategies.logit_noise import sample_scale


@register_strategy
class AimNoise(Strategy):
    name = "aim-noise"
    kind = "output"
    max_strength = 8.0
    weak = True
    description = (
        "AIM's fresh logit noise on every call; weak: voting over repeated queries removes it "
        "(a baseline for nnobf attack, refused by nnobf serve without --allow-weak)"
    )

    def transform_output(self, output: Any, inputs: Any, tier: str) -> Any:
        strength = self.strength(tier)
        if strength == 0.0:
            return output

        def add_noise(logits: torch.Tensor) -> torch.Tensor:
            if not logits.is_floating_point() or logits.dim() < 2:
                return logits
            noise = torch.randn(logits.shape, dtype=logits.dtype).to(logits.device)
            return logits + strength * sample_scale(logits) * noise

        return map_output(output, add_noise)
