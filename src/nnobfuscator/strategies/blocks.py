"""Residual blocks that run differently per tier: skipped outright, or with fewer inner channels.

A :class:`TieredBlock` wraps a torchvision ``BasicBlock`` or ``Bottleneck`` in place (the original
stays reachable as ``base_block``). At a tier that skips it, it returns its input and none of the
block's modules run. At a tier that slims it, it runs the block with only the most important inner
channels, as genuinely smaller convolutions (sliced weights cached per tier), so the work saved is
work not done; the dropped channels are replaced by their mean activation, folded into a constant
(cached per spatial size). Otherwise the original block runs untouched.

Channel importance and means come from activation statistics on calibration data when available
(:func:`collect_block_statistics`), else from the BatchNorm parameters (a Gaussian estimate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from nnobfuscator.strategies.base import TierContext, TieredLayer

ResidualBlock = BasicBlock | Bottleneck


def residual_blocks(model: nn.Module) -> dict[str, ResidualBlock]:
    """The torchvision residual blocks of ``model`` by module name, in forward order.

    Blocks already wrapped by a :class:`TieredBlock` are listed under the wrapper's name.
    """
    return {
        name.removesuffix(".base_block"): module
        for name, module in model.named_modules()
        if isinstance(module, BasicBlock | Bottleneck)
    }


def is_skippable(block: ResidualBlock) -> bool:
    """A block can be skipped when its shortcut is the identity (same shape in and out)."""
    return block.downsample is None


def stage_of(block_name: str) -> str:
    """The stage a block belongs to: ``"layer3"`` for ``"layer3.1"``."""
    return block_name.rpartition(".")[0] or block_name


def _conv(module: nn.Module) -> nn.Conv2d:
    return module.base_layer if isinstance(module, TieredLayer) else module  # type: ignore[return-value]


def _weight(module: nn.Module, tier: str) -> torch.Tensor:
    """A conv's weight at ``tier``, including what degrading strategies folded into it."""
    if isinstance(module, TieredLayer):
        weight = module.tier_weight(tier)
        return module.base_layer.weight if weight is None else weight
    return module.weight  # type: ignore[return-value]


ActivationStats = list[tuple[torch.Tensor, torch.Tensor]]


def _inner(block: ResidualBlock) -> list[tuple[nn.BatchNorm2d, nn.Module]]:
    """Per inner channel space, the BatchNorm producing it and the conv reading it.

    BasicBlock has one inner space (conv1 -> conv2); Bottleneck two (conv1 -> conv2 -> conv3).
    """
    pairs = [(block.bn1, block.conv2)]
    if isinstance(block, Bottleneck):
        pairs.append((block.bn2, block.conv3))
    return pairs


def gaussian_stats(block: ResidualBlock) -> ActivationStats:
    """Data-free (mean, std) of each inner ReLU output, taking BN outputs as N(shift, scale^2)."""
    stats = []
    for bn, _ in _inner(block):
        shift, scale = bn.bias.detach().float(), bn.weight.detach().float().abs().clamp_min(1e-6)
        t = shift / scale
        cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
        pdf = torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)
        mean = shift * cdf + scale * pdf
        second = (shift * shift + scale * scale) * cdf + shift * scale * pdf
        stats.append((mean, (second - mean * mean).clamp_min(0).sqrt()))
    return stats


def channel_importance(block: ResidualBlock, stats: ActivationStats) -> list[torch.Tensor]:
    """Per inner channel space, a score: activation std times the L1 norm of the reading weights."""
    scores = []
    for (_, reader), (_, std) in zip(_inner(block), stats, strict=True):
        reads = _conv(reader).weight.detach().float().abs().sum(dim=(0, 2, 3))
        scores.append(std.to(reads.device) * reads)
    return scores


@torch.inference_mode()
def collect_block_statistics(
    model: nn.Module, blocks: dict[str, TieredBlock], batches: list[torch.Tensor]
) -> None:
    """Measure each block's inner activation (mean, std) on ``batches`` of the untouched model."""
    sums: dict[tuple[str, int], list[torch.Tensor]] = {}

    def hook_for(name: str, space: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            act = torch.relu(output).float()
            acc = sums.setdefault((name, space), [torch.zeros(()), 0.0, 0.0])
            acc[0] = acc[0] + act.numel() / act.shape[1]
            acc[1] = acc[1] + act.sum(dim=(0, 2, 3))
            acc[2] = acc[2] + (act * act).sum(dim=(0, 2, 3))

        return hook

    handles = [
        bn.register_forward_hook(hook_for(name, space))
        for name, wrapper in blocks.items()
        for space, (bn, _) in enumerate(_inner(wrapper.base_block))
    ]
    try:
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    for name, wrapper in blocks.items():
        stats = []
        for space in range(len(_inner(wrapper.base_block))):
            count, total, squares = sums[(name, space)]
            mean = total / count
            stats.append((mean, (squares / count - mean * mean).clamp_min(0).sqrt()))
        wrapper.set_statistics(stats)


@dataclass
class _Slim:
    """A block's sliced parameters at one tier, and the weights they were cut from."""

    keep: float
    sources: tuple[torch.Tensor, ...]
    convs: list[torch.Tensor]
    norms: list[tuple[torch.Tensor, ...]]
    kept: list[torch.Tensor]
    dropped: list[torch.Tensor]
    fills: list[torch.Tensor]
    constants: dict[tuple[int, int, int], torch.Tensor]


class TieredBlock(nn.Module):
    """A residual block that is skipped, slimmed or run whole depending on the active tier.

    Args:
        base_block: the torchvision block, kept as ``base_block``.
        context: the tiered model's tier context.
    """

    def __init__(self, base_block: ResidualBlock, context: TierContext) -> None:
        super().__init__()
        self.base_block = base_block
        self._context = context
        self.skip: set[str] = set()
        self.keep: dict[str, float] = {}
        self._slims: dict[str, _Slim] = {}
        self._order: list[torch.Tensor] | None = None
        self.stats: ActivationStats | None = None

    def set_statistics(self, stats: ActivationStats | None) -> None:
        """Use measured inner activation (mean, std) per channel space (``None``: estimate)."""
        self.stats = stats
        self._order = None
        self._slims.clear()

    def activation_stats(self) -> ActivationStats:
        return self.stats if self.stats is not None else gaussian_stats(self.base_block)

    def set_keep(self, tier: str, keep: float) -> None:
        """Run ``tier`` with this share of the inner channels (1.0: all of them)."""
        self._slims.pop(tier, None)
        if keep >= 1.0:
            self.keep.pop(tier, None)
        else:
            self.keep[tier] = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tier = self._context.current
        if tier is None:
            return self.base_block(x)
        if tier in self.skip:
            return x
        if tier in self.keep:
            return self._slim_forward(x, tier)
        return self.base_block(x)

    # --- slimmed forward ----------------------------------------------------------------------
    def _convs(self) -> list[nn.Module]:
        block = self.base_block
        convs = [block.conv1, block.conv2]
        if isinstance(block, Bottleneck):
            convs.append(block.conv3)
        return convs

    def _norms(self) -> list[nn.BatchNorm2d]:
        block = self.base_block
        norms = [block.bn1, block.bn2]
        if isinstance(block, Bottleneck):
            norms.append(block.bn3)
        return norms

    def _slim(self, tier: str) -> _Slim:
        keep = self.keep[tier]
        sources = tuple(_weight(conv, tier) for conv in self._convs())
        cached = self._slims.get(tier)
        if cached is not None and cached.keep == keep and _same(cached.sources, sources):
            return cached
        stats = self.activation_stats()
        if self._order is None:
            scores = channel_importance(self.base_block, stats)
            self._order = [score.argsort(descending=True) for score in scores]
        with torch.inference_mode(False), torch.no_grad():
            device = sources[0].device
            cut = [max(1, round(keep * len(order))) for order in self._order]
            kept = [o[:n].sort().values.to(device) for o, n in zip(self._order, cut, strict=True)]
            dropped = [
                o[n:].sort().values.to(device) for o, n in zip(self._order, cut, strict=True)
            ]
            fills = [
                mean.to(device).index_select(0, d)
                for (mean, _), d in zip(stats, dropped, strict=True)
            ]
            convs, norms = [], []
            for i, weight in enumerate(sources):
                if i < len(kept):
                    weight = weight.index_select(0, kept[i])
                if i > 0:
                    weight = weight.index_select(1, kept[i - 1])
                convs.append(weight.contiguous())
            for i, bn in enumerate(self._norms()):
                stats = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
                if i < len(kept):
                    stats = tuple(t.index_select(0, kept[i]) for t in stats)
                norms.append(tuple(t.contiguous() for t in stats))
        slim = _Slim(keep, sources, convs, norms, kept, dropped, fills, {})
        self._slims[tier] = slim
        return slim

    def _constant(self, slim: _Slim, space: int, conv: nn.Module, size: tuple[int, int]):
        """What the dropped channels of ``space``, held at their mean, add to ``conv``'s output."""
        key = (space, *size)
        if key not in slim.constants:
            with torch.inference_mode(False), torch.no_grad():
                weight = slim.sources[space + 1].index_select(1, slim.dropped[space])
                if space + 1 < len(slim.kept):  # the reading conv's outputs are sliced too
                    weight = weight.index_select(0, slim.kept[space + 1])
                filled = slim.fills[space].to(weight.dtype).view(1, -1, 1, 1).expand(1, -1, *size)
                slim.constants[key] = _conv(conv)._conv_forward(filled, weight, None)
        return slim.constants[key]

    def _slim_forward(self, x: torch.Tensor, tier: str) -> torch.Tensor:
        block = self.base_block
        slim = self._slim(tier)
        out = x
        convs, norms = self._convs(), self._norms()
        for i, (conv, weight, bn, stats) in enumerate(
            zip(convs, slim.convs, norms, slim.norms, strict=True)
        ):
            size = (out.shape[-2], out.shape[-1])
            out = _conv(conv)._conv_forward(out, weight, None)
            if i > 0 and len(slim.dropped[i - 1]):
                out = out + self._constant(slim, i - 1, conv, size)
            mean, var, scale, shift = stats
            out = F.batch_norm(out, mean, var, scale, shift, False, 0.0, bn.eps)
            if i < len(convs) - 1:
                out = block.relu(out)
        identity = x if block.downsample is None else block.downsample(x)
        return block.relu(out + identity)


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))
