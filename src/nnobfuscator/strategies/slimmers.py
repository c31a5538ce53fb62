"""Slimmers: run a block with only its most important hidden channels, as smaller layers.

A slimmer ranks a block's hidden channels (activation std times the L1 norm of the weights that
read them), slices the layers that produce and read the kept ones (weights sliced per tier and
cached, including what degrading strategies folded into them), and holds the dropped channels at
their mean activation, folded into a constant. Built in here: torchvision ``BasicBlock`` /
``Bottleneck`` (hidden spaces between their convolutions) and MLPs (any ``nn.Sequential`` of
``Linear``, element-wise layers, ``Linear``, such as torchvision's ``MLPBlock``, slimmed over
their hidden units); plain conv stacks in :mod:`~nnobfuscator.strategies.conv_stack`, gated MLPs
in :mod:`~nnobfuscator.strategies.gated_mlp`; :mod:`~nnobfuscator.strategies.slimming` picks one
for a block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from nnobfuscator.core.tier_pass import DerivedCache
from nnobfuscator.strategies.norms import batch_norm_at
from nnobfuscator.strategies.slim_layers import (
    ActivationStats,
    Keep,
    Space,
    constant_map,
    mix_input,
    plain_layer,
    relu_of_gaussian,
    tier_weight,
    tier_weight_key,
)


class Slimmer:
    """Runs one block with a share of its hidden channels; subclasses know the block's layout."""

    def __init__(self, block: nn.Module, cache: DerivedCache | None = None) -> None:
        self.block = block
        self.stats: ActivationStats | None = None
        self._order: list[torch.Tensor] | None = None
        #: the tiered model's bounded cache of derived tensors (slices are shared by every tier
        #: with the same share of channels; a miss slices again)
        self.cache = cache if cache is not None else DerivedCache(0)
        self._version = 0

    def spaces(self) -> list[Space]:
        """Per hidden space: the module whose output it is, the activation applied, channel axis."""
        raise NotImplementedError

    def readers(self) -> list[nn.Module]:
        """Per hidden space, the layer that reads it."""
        raise NotImplementedError

    def estimated_stats(self) -> ActivationStats:
        """(mean, std) per hidden channel without data."""
        return [
            (torch.zeros(n), torch.ones(n))
            for n in (plain_layer(r).weight.shape[1] for r in self.readers())
        ]

    def set_statistics(self, stats: ActivationStats | None) -> None:
        """Use measured hidden activation (mean, std) per space (``None``: estimate)."""
        self.stats = stats
        self._order = None
        self._version += 1

    def activation_stats(self) -> ActivationStats:
        return self.stats if self.stats is not None else self.estimated_stats()

    def order(self) -> list[torch.Tensor]:
        """Hidden channels per space, most important first."""
        if self._order is None:
            self._order = []
            for reader, (_, std) in zip(self.readers(), self.activation_stats(), strict=True):
                weight = plain_layer(reader).weight.detach().float()
                reads = weight.abs().sum(dim=[d for d in range(weight.dim()) if d != 1])
                self._order.append((std.to(reads.device) * reads).argsort(descending=True))
        return self._order

    def space_groups(self) -> list[int] | None:
        """Per hidden space, which share of channels it takes (``None``: one share for all)."""
        return None

    def split(self, keep: Keep, device: torch.device) -> tuple[list, list]:
        """Kept and dropped channel indices per space (sorted) for a share ``keep`` (one, or one
        per space)."""
        kept, dropped = [], []
        orders = self.order()
        keeps = keep if isinstance(keep, Sequence) else [keep] * len(orders)
        for order, share in zip(orders, keeps, strict=True):
            n = max(1, round(share * len(order)))
            kept.append(order[:n].sort().values.to(device))
            dropped.append(order[n:].sort().values.to(device))
        return kept, dropped

    def layers(self) -> list[nn.Module]:
        """The layers whose weights are sliced."""
        raise NotImplementedError

    def sources(self, tier: str) -> tuple[torch.Tensor, ...]:
        """The weights slices are cut from at ``tier``."""
        return tuple(tier_weight(layer, tier) for layer in self.layers())

    def cut(self, tier: str, keep: Keep, sources: tuple[torch.Tensor, ...]) -> Any:
        """Sliced parameters for ``keep`` from ``sources``."""
        raise NotImplementedError

    def slice_key(self, tier: str, keep: Keep) -> tuple:
        """What the slices at ``tier`` depend on (tiers with equal keys share them)."""
        weights = tuple(tier_weight_key(layer, tier) for layer in self.layers())
        return ("slice", id(self), self._version, keep, weights)

    def sliced(self, tier: str, keep: Keep) -> Any:
        def cut() -> Any:
            with torch.inference_mode(False), torch.no_grad():
                return self.cut(tier, keep, self.sources(tier))

        return self.cache.get(self.slice_key(tier, keep), cut)

    def forward(self, x: torch.Tensor, tier: str, keep: float) -> torch.Tensor:
        raise NotImplementedError


class ResidualConvSlimmer(Slimmer):
    """torchvision ``BasicBlock`` (one hidden space) and ``Bottleneck`` (two)."""

    def convs(self) -> list[nn.Module]:
        block = self.block
        return [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])

    def norms(self) -> list[nn.BatchNorm2d]:
        block = self.block
        return [block.bn1, block.bn2] + ([block.bn3] if isinstance(block, Bottleneck) else [])

    def spaces(self) -> list[Space]:
        return [(bn, torch.relu, 1) for bn in self.norms()[:-1]]

    def readers(self) -> list[nn.Module]:
        return self.convs()[1:]

    def estimated_stats(self) -> ActivationStats:
        """Data-free (mean, std) of each hidden ReLU output, taking BN outputs as Gaussian."""
        return [relu_of_gaussian(bn) for bn in self.norms()[:-1]]

    def layers(self) -> list[nn.Module]:
        return self.convs()

    def cut(self, tier: str, keep: float, sources: tuple[torch.Tensor, ...]) -> Any:
        kept, dropped = self.split(keep, sources[0].device)
        fills = [
            mean.to(sources[0].device).index_select(0, d)
            for (mean, _), d in zip(self.activation_stats(), dropped, strict=True)
        ]
        convs = []
        for i, weight in enumerate(sources):
            if i < len(kept):
                weight = weight.index_select(0, kept[i])
            if i > 0:
                weight = weight.index_select(1, kept[i - 1])
            convs.append(weight.contiguous())
        return {"convs": convs, "kept": kept, "dropped": dropped, "fills": fills}

    def _constant(
        self, tier: str, keep: float, parts: dict, space: int, size: tuple[int, int]
    ) -> torch.Tensor:
        """What the dropped channels of ``space``, held at their mean, add to its reader."""

        def compute() -> torch.Tensor:
            with torch.inference_mode(False), torch.no_grad():
                weight = self.sources(tier)[space + 1].index_select(1, parts["dropped"][space])
                if space + 1 < len(parts["kept"]):  # the reader's outputs are sliced too
                    weight = weight.index_select(0, parts["kept"][space + 1])
                conv = plain_layer(self.convs()[space + 1])
                return constant_map(conv, weight, parts["fills"][space], size)

        return self.cache.get((*self.slice_key(tier, keep), "constant", space, size), compute)

    def forward(self, x: torch.Tensor, tier: str, keep: float) -> torch.Tensor:
        block = self.block
        parts = self.sliced(tier, keep)
        out = x
        convs, norms = self.convs(), self.norms()
        for i, (conv, weight, bn) in enumerate(zip(convs, parts["convs"], norms, strict=True)):
            size = (out.shape[-2], out.shape[-1])
            out = mix_input(conv, out, 1, parts["kept"][i - 1] if i > 0 else None)
            out = plain_layer(conv)._conv_forward(out, weight, None)
            if i > 0 and len(parts["dropped"][i - 1]):
                out = out + self._constant(tier, keep, parts, i - 1, size)
            out = batch_norm_at(bn, out, parts["kept"][i] if i < len(parts["kept"]) else None)
            if i < len(convs) - 1:
                out = block.relu(out)
        identity = x if block.downsample is None else block.downsample(x)
        return block.relu(out + identity)


class MLPSlimmer(Slimmer):
    """An ``nn.Sequential`` of ``Linear``, element-wise layers, ``Linear``, element-wise layers."""

    def __init__(self, block: nn.Sequential, cache: DerivedCache | None = None) -> None:
        super().__init__(block, cache)
        layers = list(block)
        second = max(i for i, m in enumerate(layers) if isinstance(plain_layer(m), nn.Linear))
        self.first, self.second = layers[0], layers[second]
        self.middle, self.tail = layers[1:second], layers[second + 1 :]

    def spaces(self) -> list[Space]:
        producer = self.middle[-1] if self.middle else self.first
        return [(producer, lambda t: t, -1)]

    def readers(self) -> list[nn.Module]:
        return [self.second]

    def layers(self) -> list[nn.Module]:
        return [self.first, self.second]

    def cut(self, tier: str, keep: float, sources: tuple[torch.Tensor, ...]) -> Any:
        first, second = sources
        (kept,), (dropped,) = self.split(keep, first.device)
        bias1, bias2 = plain_layer(self.first).bias, plain_layer(self.second).bias
        mean = self.activation_stats()[0][0].to(first.device, first.dtype)
        constant = second.index_select(1, dropped) @ mean.index_select(0, dropped)
        return (
            first.index_select(0, kept).contiguous(),
            None if bias1 is None else bias1.index_select(0, kept).contiguous(),
            second.index_select(1, kept).contiguous(),
            constant if bias2 is None else bias2 + constant,
            kept,
        )

    def forward(self, x: torch.Tensor, tier: str, keep: float) -> torch.Tensor:
        weight1, bias1, weight2, bias2, kept = self.sliced(tier, keep)
        hidden = F.linear(mix_input(self.first, x, -1), weight1, bias1)
        for module in self.middle:
            hidden = module(hidden)
        out = F.linear(mix_input(self.second, hidden, -1, kept), weight2, bias2)
        for module in self.tail:
            out = module(out)
        return out
