"""Weight noise: keyed Gaussian noise added to chosen layers' weights, scaled per layer.

At strength ``s`` a target weight becomes ``W + s * std(W) * N`` with ``N`` keyed standard normal
noise, so every layer is perturbed in proportion to its own scale.
"""

from __future__ import annotations

import torch

from nnobfuscator.core.key_derivation import keyed_normal
from nnobfuscator.core.wrapping import TieredLayer
from nnobfuscator.strategies.base import Strategy, register_strategy
from nnobfuscator.strategies.options import StrategyConfig


@register_strategy
class WeightNoise(Strategy):
    name = "weight-noise"
    max_strength = 8.0
    default_start = 1 / 2
    description = "keyed Gaussian weight noise, scaled to each layer's weight spread"

    def __init__(self, key: bytes, options: StrategyConfig | None = None) -> None:
        super().__init__(key, options)
        self.noise: dict[str, torch.Tensor] = {}
        self.scales: dict[str, float] = {}

    def prepare_layer(self, name: str, layer: TieredLayer) -> None:
        weight = layer.base_weight.detach()
        self.noise[name] = keyed_normal(self.key, tuple(weight.shape), self.name, name)
        self.scales[name] = float(weight.float().std())

    def transform_weight(self, layer: str, weight: torch.Tensor, tier: str) -> torch.Tensor:
        noise = self.noise[layer].to(weight.device)
        return weight + (self.strength(tier) * self.scales[layer]) * noise

    def derived_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.noise)
