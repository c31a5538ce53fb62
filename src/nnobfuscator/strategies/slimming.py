"""Which slimmer a block gets, by its layout (torchvision residual blocks, MLPs, conv stacks,
gated MLPs), or none."""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from nnobfuscator.core.tier_pass import DerivedCache
from nnobfuscator.strategies.conv_stack import ConvStackSlimmer, conv_positions
from nnobfuscator.strategies.gated_mlp import GatedMLPSlimmer, gated_mlp_roles
from nnobfuscator.strategies.slim_layers import (
    ELEMENTWISE,
    plain_layer,
)
from nnobfuscator.strategies.slimmers import MLPSlimmer, ResidualConvSlimmer, Slimmer


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
    if conv_positions(block) is not None:
        return ConvStackSlimmer(block, cache)  # type: ignore[arg-type]
    roles = gated_mlp_roles(block)
    if roles is not None:
        return GatedMLPSlimmer(block, roles, cache)
    return None
