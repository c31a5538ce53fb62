"""Slimmers: run a block with only its most important hidden channels, as smaller layers.

A slimmer ranks a block's hidden channels (activation std times the L1 norm of the weights that
read them), slices the layers that produce and read the kept ones (weights sliced per tier and
cached, including what degrading strategies folded into them), and holds the dropped channels at
their mean activation, folded into a constant. Two kinds are built in:

- torchvision ``BasicBlock`` / ``Bottleneck`` (hidden spaces between their convolutions);
- MLPs: any ``nn.Sequential`` of ``Linear``, element-wise layers, ``Linear`` (transformer MLPs such
  as torchvision's ``MLPBlock``), slimmed over their hidden units.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from nnobfuscator.strategies.norms import batch_norm_at
from nnobfuscator.wrapping import TieredLayer

ActivationStats = list[tuple[torch.Tensor, torch.Tensor]]
Space = tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], int]
_ELEMENTWISE = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Dropout,
    nn.Identity,
)


def _plain(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, TieredLayer) else module


def _weight(module: nn.Module, tier: str) -> torch.Tensor:
    """A layer's weight at ``tier``, including what degrading strategies folded into it."""
    if isinstance(module, TieredLayer):
        weight = module.tier_weight(tier)
        return module.base_weight if weight is None else weight
    return module.weight  # type: ignore[return-value]


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class Slimmer:
    """Runs one block with a share of its hidden channels; subclasses know the block's layout."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.stats: ActivationStats | None = None
        self._order: list[torch.Tensor] | None = None
        self._cache: dict[str, tuple[float, tuple[torch.Tensor, ...], Any]] = {}

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
            for n in (_plain(r).weight.shape[1] for r in self.readers())
        ]

    def set_statistics(self, stats: ActivationStats | None) -> None:
        """Use measured hidden activation (mean, std) per space (``None``: estimate)."""
        self.stats = stats
        self._order = None
        self._cache.clear()

    def activation_stats(self) -> ActivationStats:
        return self.stats if self.stats is not None else self.estimated_stats()

    def order(self) -> list[torch.Tensor]:
        """Hidden channels per space, most important first."""
        if self._order is None:
            self._order = []
            for reader, (_, std) in zip(self.readers(), self.activation_stats(), strict=True):
                weight = _plain(reader).weight.detach().float()
                reads = weight.abs().sum(dim=[d for d in range(weight.dim()) if d != 1])
                self._order.append((std.to(reads.device) * reads).argsort(descending=True))
        return self._order

    def split(self, keep: float, device: torch.device) -> tuple[list, list]:
        """Kept and dropped channel indices per space (sorted) for a share ``keep``."""
        kept, dropped = [], []
        for order in self.order():
            n = max(1, round(keep * len(order)))
            kept.append(order[:n].sort().values.to(device))
            dropped.append(order[n:].sort().values.to(device))
        return kept, dropped

    def sources(self, tier: str) -> tuple[torch.Tensor, ...]:
        """The weights slices are cut from at ``tier``."""
        raise NotImplementedError

    def cut(self, tier: str, keep: float, sources: tuple[torch.Tensor, ...]) -> Any:
        """Sliced parameters for ``keep`` (built once per tier, share and source weights)."""
        raise NotImplementedError

    def sliced(self, tier: str, keep: float) -> Any:
        sources = self.sources(tier)
        cached = self._cache.get(tier)
        if cached is not None and cached[0] == keep and _same(cached[1], sources):
            return cached[2]
        with torch.inference_mode(False), torch.no_grad():
            parts = self.cut(tier, keep, sources)
        self._cache[tier] = (keep, sources, parts)
        return parts

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
        stats = []
        for bn in self.norms()[:-1]:
            shift = bn.bias.detach().float()
            scale = bn.weight.detach().float().abs().clamp_min(1e-6)
            t = shift / scale
            cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
            pdf = torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)
            mean = shift * cdf + scale * pdf
            second = (shift * shift + scale * scale) * cdf + shift * scale * pdf
            stats.append((mean, (second - mean * mean).clamp_min(0).sqrt()))
        return stats

    def sources(self, tier: str) -> tuple[torch.Tensor, ...]:
        return tuple(_weight(conv, tier) for conv in self.convs())

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
        return {
            "convs": convs,
            "kept": kept,
            "dropped": dropped,
            "fills": fills,
            "sources": sources,
            "constants": {},
        }

    def _constant(self, parts: dict, space: int, size: tuple[int, int]) -> torch.Tensor:
        """What the dropped channels of ``space``, held at their mean, add to its reader."""
        key = (space, *size)
        if key not in parts["constants"]:
            with torch.inference_mode(False), torch.no_grad():
                weight = parts["sources"][space + 1].index_select(1, parts["dropped"][space])
                if space + 1 < len(parts["kept"]):  # the reader's outputs are sliced too
                    weight = weight.index_select(0, parts["kept"][space + 1])
                fill = parts["fills"][space].to(weight.dtype).view(1, -1, 1, 1).expand(1, -1, *size)
                conv = _plain(self.convs()[space + 1])
                parts["constants"][key] = conv._conv_forward(fill, weight, None)
        return parts["constants"][key]

    def forward(self, x: torch.Tensor, tier: str, keep: float) -> torch.Tensor:
        block = self.block
        parts = self.sliced(tier, keep)
        out = x
        convs, norms = self.convs(), self.norms()
        for i, (conv, weight, bn) in enumerate(zip(convs, parts["convs"], norms, strict=True)):
            size = (out.shape[-2], out.shape[-1])
            out = _plain(conv)._conv_forward(out, weight, None)
            if i > 0 and len(parts["dropped"][i - 1]):
                out = out + self._constant(parts, i - 1, size)
            out = batch_norm_at(bn, out, parts["kept"][i] if i < len(parts["kept"]) else None)
            if i < len(convs) - 1:
                out = block.relu(out)
        identity = x if block.downsample is None else block.downsample(x)
        return block.relu(out + identity)


class MLPSlimmer(Slimmer):
    """An ``nn.Sequential`` of ``Linear``, element-wise layers, ``Linear``, element-wise layers."""

    def __init__(self, block: nn.Sequential) -> None:
        super().__init__(block)
        layers = list(block)
        second = max(i for i, m in enumerate(layers) if isinstance(_plain(m), nn.Linear))
        self.first, self.second = layers[0], layers[second]
        self.middle, self.tail = layers[1:second], layers[second + 1 :]

    def spaces(self) -> list[Space]:
        producer = self.middle[-1] if self.middle else self.first
        return [(producer, lambda t: t, -1)]

    def readers(self) -> list[nn.Module]:
        return [self.second]

    def sources(self, tier: str) -> tuple[torch.Tensor, ...]:
        return (_weight(self.first, tier), _weight(self.second, tier))

    def cut(self, tier: str, keep: float, sources: tuple[torch.Tensor, ...]) -> Any:
        first, second = sources
        (kept,), (dropped,) = self.split(keep, first.device)
        bias1, bias2 = _plain(self.first).bias, _plain(self.second).bias
        mean = self.activation_stats()[0][0].to(first.device, first.dtype)
        constant = second.index_select(1, dropped) @ mean.index_select(0, dropped)
        return (
            first.index_select(0, kept).contiguous(),
            None if bias1 is None else bias1.index_select(0, kept).contiguous(),
            second.index_select(1, kept).contiguous(),
            constant if bias2 is None else bias2 + constant,
        )

    def forward(self, x: torch.Tensor, tier: str, keep: float) -> torch.Tensor:
        weight1, bias1, weight2, bias2 = self.sliced(tier, keep)
        hidden = F.linear(x, weight1, bias1)
        for module in self.middle:
            hidden = module(hidden)
        out = F.linear(hidden, weight2, bias2)
        for module in self.tail:
            out = module(out)
        return out


def _is_mlp(module: nn.Module) -> bool:
    if not isinstance(module, nn.Sequential) or len(module) < 2:
        return False
    layers = [_plain(m) for m in module]
    linear = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
    if len(linear) != 2 or linear[0] != 0:
        return False
    others = [m for m in layers if not isinstance(m, nn.Linear)]
    hidden = layers[0].out_features
    return (
        all(isinstance(m, _ELEMENTWISE) for m in others) and layers[linear[1]].in_features == hidden
    )


def slimmer_for(block: nn.Module) -> Slimmer | None:
    """A slimmer for ``block`` when it has a known layout, else ``None``."""
    if isinstance(block, BasicBlock | Bottleneck):
        return ResidualConvSlimmer(block)
    if _is_mlp(block):
        return MLPSlimmer(block)  # type: ignore[arg-type]
    return None
