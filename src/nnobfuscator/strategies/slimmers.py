"""Slimmers: run a block with only its most important hidden channels, as smaller layers.

A slimmer ranks a block's hidden channels (activation std times the L1 norm of the weights that
read them), slices the layers that produce and read the kept ones (weights sliced per tier and
cached, including what degrading strategies folded into them), and holds the dropped channels at
their mean activation, folded into a constant. Two kinds are built in:

- torchvision ``BasicBlock`` / ``Bottleneck`` (hidden spaces between their convolutions);
- MLPs: any ``nn.Sequential`` of ``Linear``, element-wise layers, ``Linear`` (transformer MLPs such
  as torchvision's ``MLPBlock``), slimmed over their hidden units;
- plain conv stacks: any ``nn.Sequential`` of ``Conv2d``, ``BatchNorm2d``, element-wise and pooling
  layers with two convolutions or more (VGG's ``features``), slimmed over the hidden spaces between
  consecutive convolutions, one share of channels per spatial resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from nnobfuscator.core.tier_pass import DerivedCache
from nnobfuscator.strategies.norms import batch_norm_at
from nnobfuscator.strategies.slim_layers import (
    CHANNELWISE,
    ELEMENTWISE,
    POOLS,
    ActivationStats,
    Keep,
    Space,
    constant_map,
    mix_input,
    pair,
    plain_layer,
    relu_of_gaussian,
    tier_weight,
    tier_weight_key,
    unchanged,
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


def _conv_positions(module: nn.Module) -> list[int] | None:
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
        positions = _conv_positions(block)
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


def _is_mlp(module: nn.Module) -> bool:
    if not isinstance(module, nn.Sequential) or len(module) < 2:
        return False
    layers = [plain_layer(m) for m in module]
    linear = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
    if len(linear) != 2 or linear[0] != 0:
        return False
    others = [m for m in layers if not isinstance(m, nn.Linear)]
    hidden = layers[0].out_features
    return (
        all(isinstance(m, ELEMENTWISE) for m in others) and layers[linear[1]].in_features == hidden
    )


def slimmer_for(block: nn.Module, cache: DerivedCache | None = None) -> Slimmer | None:
    """A slimmer for ``block`` when it has a known layout, else ``None``."""
    if isinstance(block, BasicBlock | Bottleneck):
        return ResidualConvSlimmer(block, cache)
    if _is_mlp(block):
        return MLPSlimmer(block, cache)  # type: ignore[arg-type]
    if _conv_positions(block) is not None:
        return ConvStackSlimmer(block, cache)  # type: ignore[arg-type]
    return None
