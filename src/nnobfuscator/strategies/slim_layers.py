"""What slimming reads of a layer: its weight at a tier (with what strategies folded in), the
map a convolution makes of channels held constant, the mix of its input in the pass in flight,
and which layer types act on each channel alone."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nnobfuscator.core.tier_pass import tensor_identity
from nnobfuscator.core.wrapping import TieredLayer, acts_on_activations
from nnobfuscator.strategies.bn_reestimate import TieredNorm

#: per hidden channel: (mean, std) of its activation
ActivationStats = list[tuple[torch.Tensor, torch.Tensor]]
Space = tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], int]
ELEMENTWISE = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Dropout,
    nn.Identity,
)
POOLS = (nn.MaxPool2d, nn.AvgPool2d)
#: layers that act on each channel alone (a channel held constant stays constant through them)
CHANNELWISE = (
    *ELEMENTWISE,
    *POOLS,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Dropout2d,
)
Keep = float | tuple[float, ...]


def plain_layer(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, TieredLayer | TieredNorm) else module


def relu_of_gaussian(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free (mean, std) of ``relu(bn(x))``, taking the BN output as Gaussian."""
    shift = bn.bias.detach().float()
    scale = bn.weight.detach().float().abs().clamp_min(1e-6)
    t = shift / scale
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    pdf = torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    mean = shift * cdf + scale * pdf
    second = (shift * shift + scale * scale) * cdf + shift * scale * pdf
    return mean, (second - mean * mean).clamp_min(0).sqrt()


def reader_input(x: torch.Tensor) -> torch.Tensor:
    """The activation of a hidden space that is its module's *input* (a gated MLP's hidden units
    exist only as what its down projection reads): statistics hook the module's input."""
    return x


def unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def pair(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return value if isinstance(value, tuple) else (value, value)


def tier_weight(module: nn.Module, tier: str) -> torch.Tensor:
    """A layer's weight at ``tier``, with what weight-folding strategies folded into it
    (strategies that act on activations are applied to the slimmed input instead)."""
    if isinstance(module, TieredLayer):
        weight = module.tier_weight(tier)
        return module.base_weight if weight is None else weight
    return module.weight  # type: ignore[return-value]


def tier_weight_key(module: nn.Module, tier: str) -> Any:
    """What :func:`tier_weight` depends on: the folded strategies' signatures and the base weight."""
    plain = plain_layer(module)
    base = plain.weight
    folded = (
        tuple(t.signature(tier) for t in module.transforms.values() if not acts_on_activations(t))
        if isinstance(module, TieredLayer)
        else ()
    )
    return folded, tensor_identity(base)


def constant_map(
    conv: nn.Module, weight: torch.Tensor, fill: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """``conv`` with ``weight`` on a ``size`` map whose channels are constant at ``fill``.

    By linearity this is one single-channel convolution of a map of ones with the fill-weighted
    sum of the kernels (borders included): far cheaper than convolving every dropped channel.
    """
    fill = fill.to(weight.dtype).view(1, -1, *([1] * (weight.dim() - 2)))
    if conv.groups != 1:
        return conv._conv_forward(fill.expand(1, -1, *size), weight, None)
    folded = (weight * fill).sum(1, keepdim=True)
    return conv._conv_forward(weight.new_ones(1, 1, *size), folded, None)


def mix_input(
    module: nn.Module, x: torch.Tensor, feature_axis: int, channels: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` as ``module`` sees it in the pass in flight (feature mixing, per sample)."""
    if not isinstance(module, TieredLayer):
        return x
    return module.transform_activation(x, feature_axis, 0 if x.dim() > 1 else None, channels)
