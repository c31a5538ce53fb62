"""Feature mixing: a keyed random orthogonal mix of input features at chosen layers.

At strength ``s`` a target layer sees ``h' = h + s * (Q h - h)`` instead of ``h``, with ``Q`` a keyed
orthogonal map over the layer's input features (within each group of a grouped convolution; over
the embedding of an attention's packed q/k/v projection). ``Q`` mixes consecutive features in
groups of up to ``block``, each by its own keyed orthogonal matrix
(:func:`~nnobfuscator.core.key_derivation.keyed_block_orthogonal`).

The mix is applied to the layer's input activation, with one strength per sample: no per-tier
weight exists (the model stays one model), a batch mixing tiers runs in one pass, and the cost is
one batched product by block matrices, ``block`` multiply-adds per input feature (a few percent of
the FLOPs of a 3x3 convolution as wide). Being linear, it
can also be folded into the weight (``W' = W M``): sealed bundles ship it that way. Deterministic
and smooth in ``s``; re-derived from the key, never stored.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from nnobfuscator.core.key_derivation import keyed_block_orthogonal
from nnobfuscator.core.wrapping import TieredLayer
from nnobfuscator.strategies.base import Strategy, register_strategy
from nnobfuscator.strategies.options import StrategyConfig

#: features mixed together (artifacts of nnobfuscator 0.3 and earlier used 256, after a keyed
#: permutation: ``core.serialization.LEGACY_FEATURE_MIX``)
DEFAULT_BLOCK = 32


@dataclasses.dataclass
class FeatureMixConfig(StrategyConfig):
    """Options of ``feature-mix``.

    Args:
        block: features mixed together by one keyed orthogonal matrix (at least 2); larger
            blocks mix more widely and cost ``block`` multiply-adds per input feature.
        permute: permute the features by a keyed permutation before cutting them into blocks
            (what artifacts of 0.3 and earlier did; two gathers per call).
    """

    name: str = "feature-mix"
    block: int = DEFAULT_BLOCK
    permute: bool = False

    def validate(self) -> None:
        super().validate()
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 2:
            raise ValueError(f"feature-mix block must be an integer >= 2, got {self.block!r}")
        if not isinstance(self.permute, bool):
            raise ValueError(f"feature-mix permute must be true or false, got {self.permute!r}")


class Mixer:
    """A keyed block-orthogonal map ``Q`` on ``size`` features: blocks of consecutive features,
    each mixed by its own orthogonal matrix, optionally after a keyed permutation (artifacts of
    0.3 and earlier; two gathers per call, so new models leave it out)."""

    def __init__(self, permutation: torch.Tensor | None, blocks: list[torch.Tensor]) -> None:
        self.permutation, self.blocks = permutation, blocks
        self.inverse = None if permutation is None else permutation.argsort()
        self.size = sum(b.shape[0] for b in blocks)
        # Consecutive blocks of one size, stacked: ``Q h`` is one batched product per size.
        self.groups: list[tuple[int, torch.Tensor]] = []
        start = 0
        for size in dict.fromkeys(b.shape[0] for b in blocks):
            same = [b for b in blocks if b.shape[0] == size]
            self.groups.append((start, torch.stack([b.T for b in same])))
            start += size * len(same)
        self._on: dict[torch.device, Mixer] = {}

    def to(self, device: torch.device) -> Mixer:
        if self.blocks[0].device == device:
            return self
        if device not in self._on:
            permutation = None if self.permutation is None else self.permutation.to(device)
            self._on[device] = Mixer(permutation, [b.to(device) for b in self.blocks])
        return self._on[device]

    def apply(self, x: torch.Tensor, axis: int, strength: float | None = None) -> torch.Tensor:
        """``Q x`` along ``axis``; with a ``strength`` ``s``, ``x + s (Q x - x)`` in one product
        (``((1 - s) I + s Q) x``)."""
        mixer = self.to(x.device)
        if mixer.permutation is not None:
            x = x.index_select(axis, mixer.permutation)
        parts = []
        for start, stack in mixer.groups:
            count, size = stack.shape[0], stack.shape[1]
            matrices = stack.to(x.dtype)
            if strength is not None:
                eye = _identity(size, x.dtype, x.device)
                matrices = torch.lerp(eye.expand_as(matrices), matrices, strength)
            part = x if len(mixer.groups) == 1 else x.narrow(axis, start, count * size)
            parts.append(_block_product(part, matrices, axis))
        mixed = parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)
        if mixer.inverse is not None:
            mixed = mixed.index_select(axis, mixer.inverse)
        return mixed


def _block_product(x: torch.Tensor, stack: torch.Tensor, axis: int) -> torch.Tensor:
    """Each consecutive group of ``stack.shape[1]`` features along ``axis`` times its matrix
    (``y_g = stack[g] @ x_g``).

    Batched matrix products, not a grouped convolution (2-5x slower on CPU at these sizes): a
    broadcast product when each feature carries many positions (a conv map), else one product
    per group over every sample and position at once (vectors, tiny maps).
    """
    count, size = stack.shape[0], stack.shape[1]
    axis = axis % x.dim()
    lead = math.prod(x.shape[:axis])
    trail = math.prod(x.shape[axis + 1 :])
    grouped = x.reshape(lead, count, size, trail)
    if trail >= _BROADCAST_FROM:
        return torch.matmul(stack, grouped).reshape(x.shape)
    rows = grouped.permute(1, 0, 3, 2).reshape(count, lead * trail, size)
    mixed = torch.bmm(rows, stack.transpose(1, 2))
    return mixed.view(count, lead, trail, size).permute(1, 0, 3, 2).reshape(x.shape)


#: positions per feature from which the broadcast product beats one product per group (CPU)
_BROADCAST_FROM = 8


@functools.cache
def _identity(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # usable in and out of inference mode
        return torch.eye(size, dtype=dtype, device=device)


def mix_weight(weight: torch.Tensor, mixer: Mixer, strength: float) -> torch.Tensor:
    """``W (I + s (Q - I))``, contracting ``weight``'s input axis 1: ``W' h == W (h + s(Qh - h))``."""
    mixer = mixer.to(weight.device)
    permutation = mixer.permutation
    permuted = weight if permutation is None else weight.index_select(1, permutation)
    mixed = torch.empty_like(weight)
    start = 0
    for block in mixer.blocks:
        end = start + block.shape[0]
        # (Q h)[perm[start + j]] = sum_i B[i, j] h[perm[start + i]], so W Q takes B on its side
        mixed[:, start:end] = torch.einsum("oj...,ij->oi...", permuted[:, start:end], block)
        start = end
    if permutation is None:
        folded = mixed
    else:
        folded = torch.empty_like(weight)
        folded.index_copy_(1, permutation, mixed)
    return weight + strength * (folded - weight)


@register_strategy
class FeatureMix(Strategy):
    name = "feature-mix"
    description = "keyed orthogonal feature mixing at chosen layers' inputs (a few % of their cost)"

    config_class = FeatureMixConfig

    def __init__(self, key: bytes, options: StrategyConfig | None = None) -> None:
        super().__init__(key, options)
        self.block = self.options.block
        self.permute = self.options.permute
        self.mixers: dict[str, Mixer] = {}
        self._subset_mixers: dict[tuple[str, int], Mixer] = {}

    def prepare_layer(self, name: str, layer: TieredLayer) -> None:
        features = layer.base_weight.shape[1]
        self.mixers[name] = self._mixer(features, name)

    def _mixer(self, size: int, *labels: str) -> Mixer:
        permutation, blocks = keyed_block_orthogonal(
            self.key, size, self.name, *labels, block=self.block
        )
        return Mixer(permutation if self.permute else None, blocks)

    def mixer(self, layer: str, size: int) -> Mixer:
        """The mix of ``layer``'s input at ``size`` features (fewer in a slimmed block: the kept
        channels get their own keyed mix)."""
        full = self.mixers[layer]
        if size == full.size:
            return full
        if (layer, size) not in self._subset_mixers:
            self._subset_mixers[(layer, size)] = self._mixer(size, layer, "kept")
        return self._subset_mixers[(layer, size)]

    def transform_activation(
        self,
        layer: str,
        x: torch.Tensor,
        strength: float | torch.Tensor,
        axis: int,
        channels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x + s (Q x - x)`` along the feature ``axis`` (``s`` a number or per sample).

        The input of a grouped convolution holds ``groups`` runs of the weight's input features:
        each is mixed alike, as folding ``Q`` into the weight would.
        """
        full = self.mixers[layer].size
        size = x.shape[axis]
        uniform = None if isinstance(strength, torch.Tensor) else float(strength)
        if channels is None and size != full and size % full == 0 and axis == 1:
            groups = size // full
            flat = x.reshape(x.shape[0] * groups, full, *x.shape[2:])
            mixed = self.mixers[layer].apply(flat, 1, uniform).reshape(x.shape)
        else:
            mixed = self.mixer(layer, size).apply(x, axis, uniform)
        return mixed if uniform is not None else torch.lerp(x, mixed, strength)

    def activation_macs(self, layer: str) -> float:
        """Multiply-adds per input element of mixing ``layer``'s input (its block width)."""
        return float(max(block.shape[0] for block in self.mixers[layer].blocks))

    def transform_weight(self, layer: str, weight: torch.Tensor, tier: str) -> torch.Tensor:
        return mix_weight(weight, self.mixers[layer], self.strength(tier))

    def derived_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, mixer in self.mixers.items():
            if mixer.permutation is not None:
                tensors[f"{name}/permutation"] = mixer.permutation
            tensors.update({f"{name}/block{i}": block for i, block in enumerate(mixer.blocks)})
        return tensors
