"""Slimming plain conv stacks: any ``nn.Sequential`` of ``Conv2d``, ``BatchNorm2d``, element-wise
and pooling layers with two convolutions or more (VGG's ``features``), over the hidden spaces
between consecutive convolutions, one share of channels per spatial resolution."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nnobfuscator.core.tier_pass import DerivedCache
from nnobfuscator.strategies.norms import batch_norm_at
from nnobfuscator.strategies.slim_layers import (
    CHANNELWISE,
    POOLS,
    ActivationStats,
    Keep,
    Space,
    constant_map,
    mix_input,
    pair,
    plain_layer,
    relu_of_gaussian,
    unchanged,
)
from nnobfuscator.strategies.slimmers import Slimmer


def conv_positions(module: nn.Module) -> list[int] | None:
    """Positions of the convolutions of a plain conv stack (see :class:`ConvStackSlimmer`), or
    ``None`` when ``module`` is not one."""
    if not isinstance(module, nn.Sequential) or len(module) < 2:
        return None
    layers = [plain_layer(m) for m in module]
    if len({id(m) for m in layers}) != len(layers):  # a layer used twice: spaces would clash
        return None
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    if len(convs) < 2:
        return None
    channels = None
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or (channels is not None and layer.in_channels != channels):
                return None
            channels = layer.out_channels
        elif isinstance(layer, nn.BatchNorm2d):
            if channels is None or layer.num_features != channels or not layer.affine:
                return None
        elif not isinstance(layer, CHANNELWISE):
            return None
    return convs


class ConvStackSlimmer(Slimmer):
    """A plain conv stack: an ``nn.Sequential`` of ``Conv2d`` (ungrouped), ``BatchNorm2d``,
    element-wise and pooling layers, with two convolutions or more (VGG's ``features``).

    Hidden space ``i`` lies between convolution ``i`` and ``i + 1``: the kept output channels of
    convolution ``i`` run as a smaller convolution, normalised with :func:`batch_norm_at` (so
    re-estimated statistics apply), and the dropped ones are held at their mean at the next
    convolution's input (after any pooling, which leaves a constant channel constant), folded into
    a constant. The last convolution keeps its full output. Spaces produced at the same spatial
    resolution share a group (:meth:`space_groups`), which channel slim may give its own share.
    """

    def __init__(self, block: nn.Sequential, cache: DerivedCache | None = None) -> None:
        super().__init__(block, cache)
        positions = conv_positions(block)
        if positions is None:
            raise ValueError("not a plain conv stack")
        self.positions = positions
        #: per space, its share of channels at a tier (set by channel slim; default: ``keep``)
        self.space_keeps: Callable[[str], tuple[float, ...]] | None = None

    def convs(self) -> list[nn.Module]:
        return [self.block[i] for i in self.positions]

    def _between(self, space: int) -> list[nn.Module]:
        """The layers after convolution ``space`` up to the next one (or the end)."""
        end = self.positions[space + 1] if space + 1 < len(self.positions) else len(self.block)
        return [self.block[i] for i in range(self.positions[space] + 1, end)]

    def spaces(self) -> list[Space]:
        """Measured where the next convolution reads them (after activation and pooling)."""
        return [
            (self.block[self.positions[i + 1] - 1], unchanged, 1)
            for i in range(len(self.positions) - 1)
        ]

    def readers(self) -> list[nn.Module]:
        return self.convs()[1:]

    def layers(self) -> list[nn.Module]:
        return self.convs()

    def space_groups(self) -> list[int]:
        """Per space, how many downsamplings (pools, strided convolutions) precede its producer."""
        groups, level = [], 0
        for index, module in enumerate(self.block):
            layer = plain_layer(module)
            if index in self.positions[:-1]:
                groups.append(level)
            strided = isinstance(layer, nn.Conv2d) and max(pair(layer.stride)) > 1
            if isinstance(layer, POOLS) or strided:
                level += 1
        return groups

    def estimated_stats(self) -> ActivationStats:
        """Data-free statistics: a ReLU of a Gaussian BN output where the space has both."""
        fallback = super().estimated_stats()
        stats = []
        for space, default in enumerate(fallback):
            between = [plain_layer(m) for m in self._between(space)]
            norms = [m for m in between if isinstance(m, nn.BatchNorm2d)]
            relu = any(isinstance(m, nn.ReLU) for m in between)
            stats.append(relu_of_gaussian(norms[-1]) if norms and relu else default)
        return stats

    def keeps(self, tier: str, keep: float) -> tuple[float, ...]:
        """The share of channels per space at ``tier``."""
        if self.space_keeps is not None:
            return tuple(self.space_keeps(tier))
        return (keep,) * (len(self.positions) - 1)

    def cut(self, tier: str, keep: Keep, sources: tuple[torch.Tensor, ...]) -> Any:
        device = sources[0].device
        kept, dropped = self.split(keep, device)
        fills = [
            mean.to(device).index_select(0, d)
            for (mean, _), d in zip(self.activation_stats(), dropped, strict=True)
        ]
        weights, biases = [], []
        for i, (conv, weight) in enumerate(zip(self.convs(), sources, strict=True)):
            bias = plain_layer(conv).bias
            if i < len(kept):
                weight = weight.index_select(0, kept[i])
                bias = None if bias is None else bias.index_select(0, kept[i])
            if i > 0:
                weight = weight.index_select(1, kept[i - 1])
            weights.append(weight.contiguous())
            biases.append(None if bias is None else bias.detach().contiguous())
        return {
            "weights": weights,
            "biases": biases,
            "kept": kept,
            "dropped": dropped,
            "fills": fills,
        }

    def _constant(
        self, tier: str, keep: Keep, parts: dict, space: int, size: tuple[int, int]
    ) -> torch.Tensor:
        """What the dropped channels of ``space``, held at their mean, add to its reader."""

        def compute() -> torch.Tensor:
            with torch.inference_mode(False), torch.no_grad():
                weight = self.sources(tier)[space + 1].index_select(1, parts["dropped"][space])
                if space + 1 < len(parts["kept"]):
                    weight = weight.index_select(0, parts["kept"][space + 1])
                conv = plain_layer(self.convs()[space + 1])
                return constant_map(conv, weight, parts["fills"][space], size)

        return self.cache.get((*self.slice_key(tier, keep), "constant", space, size), compute)

    def forward(self, x: torch.Tensor, tier: str, keep: float) -> torch.Tensor:
        keeps = self.keeps(tier, keep)
        parts = self.sliced(tier, keeps)
        kept = parts["kept"]
        out = x
        for module in list(self.block)[: self.positions[0]]:
            out = module(out)
        for i, conv in enumerate(self.convs()):
            size = (out.shape[-2], out.shape[-1])
            out = mix_input(conv, out, 1, kept[i - 1] if i > 0 else None)
            out = plain_layer(conv)._conv_forward(out, parts["weights"][i], parts["biases"][i])
            if i > 0 and len(parts["dropped"][i - 1]):
                out = out + self._constant(tier, keeps, parts, i - 1, size)
            channels = kept[i] if i < len(kept) else None
            for module in self._between(i):
                if isinstance(plain_layer(module), nn.BatchNorm2d):
                    out = batch_norm_at(module, out, channels)
                else:
                    out = module(out)
        return out
