"""Feature mixing: a keyed random orthogonal mix of input features at chosen layers.

At strength ``s`` a target layer sees ``h' = h + s * (Q h - h)`` instead of ``h``, with ``Q`` a keyed
orthogonal map over the layer's input features (within each group of a grouped convolution; over
the embedding of an attention's packed q/k/v projection). ``Q`` permutes the features and mixes
them in groups of up to 256 (:func:`~nnobfuscator.security.keys.keyed_block_orthogonal`), so it is
cheap at any width. The mix is linear, so it is folded into the layer's weight (``W' = W M``,
contracting the weight's input axis 1): a tier costs exactly what the plain layer costs.
Deterministic and smooth in ``s``; re-derived from the key, never stored.
"""

from __future__ import annotations

import torch

from nnobfuscator.security.keys import keyed_block_orthogonal
from nnobfuscator.strategies.base import Strategy, register_strategy
from nnobfuscator.wrapping import TieredLayer

Mixer = tuple[torch.Tensor, list[torch.Tensor]]


def mix_weight(weight: torch.Tensor, mixer: Mixer, strength: float) -> torch.Tensor:
    """``W (I + s (Q - I))`` for ``Q h = blocks(h[perm])``, contracting ``weight``'s axis 1."""
    permutation, blocks = mixer
    permutation = permutation.to(weight.device)
    permuted = weight.index_select(1, permutation)  # W[:, perm]: the features Q's blocks read
    mixed = torch.empty_like(weight)
    start = 0
    for block in blocks:
        end = start + block.shape[0]
        part = permuted[:, start:end]
        # (W Q)[:, perm[start:end]] = W[:, perm[start:end]] B: W Q h == W (Q h)
        mixed[:, start:end] = torch.einsum("oj...,ij->oi...", part, block.to(weight.device))
        start = end
    folded = torch.empty_like(weight)
    folded.index_copy_(1, permutation, mixed)
    return weight + strength * (folded - weight)


@register_strategy
class FeatureMix(Strategy):
    name = "feature-mix"
    description = (
        "keyed orthogonal feature mixing folded into chosen layers' weights (free at run time)"
    )

    def __init__(self, key: bytes, targets: list[str] | None = None, **options) -> None:
        super().__init__(key, targets, **options)
        self.mixers: dict[str, Mixer] = {}

    def prepare_layer(self, name: str, layer: TieredLayer) -> None:
        features = layer.base_weight.shape[1]
        self.mixers[name] = keyed_block_orthogonal(self.key, features, self.name, name)

    def transform_weight(self, layer: str, weight: torch.Tensor, tier: str) -> torch.Tensor:
        return mix_weight(weight, self.mixers[layer], self.strength(tier))

    def derived_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, (permutation, blocks) in self.mixers.items():
            tensors[f"{name}/permutation"] = permutation
            tensors.update({f"{name}/block{i}": block for i, block in enumerate(blocks)})
        return tensors
