"""Feature mixing: a keyed random orthogonal mix of input channels at chosen layers.

At strength ``s`` a target layer sees ``h' = h + s * (Q h - h)`` instead of ``h``, with ``Q`` a keyed
orthogonal matrix. The mix is linear, so it is folded into the layer's weights (``W' = W M``): a
tier costs exactly what the plain layer costs. Deterministic and smooth in ``s``.
"""

from __future__ import annotations

import torch

from nnobfuscator.security.keys import keyed_orthogonal
from nnobfuscator.strategies.base import Strategy, TieredLayer, register_strategy


@register_strategy
class FeatureMix(Strategy):
    name = "feature-mix"
    description = (
        "keyed orthogonal channel mixing folded into chosen layers' weights (free at run time)"
    )

    def __init__(self, key: bytes, targets: list[str] | None = None, **options) -> None:
        super().__init__(key, targets, **options)
        self.mixers: dict[str, torch.Tensor] = {}

    def attach_layer(self, name: str, layer: TieredLayer) -> None:
        channels = layer.base_layer.weight.shape[1]
        self.mixers[name] = keyed_orthogonal(self.key, channels, self.name, name)

    def transform_weight(self, name: str, weight: torch.Tensor, strength: float) -> torch.Tensor:
        q = self.mixers[name].to(weight.device)
        identity = torch.eye(q.shape[0], device=weight.device)
        mix = identity + strength * (q - identity)
        # conv(W, M h) == conv(W M, h): contract W's input-channel axis with M's row axis.
        return torch.einsum("oj...,ji->oi...", weight, mix)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.name}/{name}": q for name, q in self.mixers.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.mixers:
            self.mixers[name] = tensors[f"{self.name}/{name}"].float()
