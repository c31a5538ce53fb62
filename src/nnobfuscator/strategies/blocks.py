"""Residual blocks and hidden layers that run differently per tier: skipped, or slimmed.

A :class:`TieredBlock` wraps a block of the user's model in place (the original stays reachable as
``base_block``). At a tier that skips it, it returns its input and none of the block's modules run.
At a tier that slims it, a :class:`Slimmer` runs it with only its most important hidden channels
as genuinely smaller layers (the dropped channels held at their mean activation, folded into a
constant), so the work saved is work not done. Otherwise the original block runs untouched.

Which blocks can be skipped is a registry keyed by module type (:func:`register_block`), filled for
torchvision's residual blocks; users add their own. A block is skippable when its output is
``input + f(input)`` with an identity shortcut (then skipping means ``f = 0``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models import (
    convnext,
    efficientnet,
    mnasnet,
    mobilenetv2,
    mobilenetv3,
    regnet,
    resnet,
    swin_transformer,
    vision_transformer,
)

from nnobfuscator.registry import TypeRegistry
from nnobfuscator.strategies.slimmers import Slimmer, slimmer_for
from nnobfuscator.wrapping import DerivedCache, Host, TierContext, unwrapped_name


@dataclass(frozen=True)
class BlockAdapter:
    """What the core needs to know about a block type.

    Args:
        skippable: whether an instance's output is ``input + f(input)`` (identity shortcut, same
            shape in and out), so that skipping it returns its input.
    """

    skippable: Callable[[nn.Module], bool]


BLOCKS: TypeRegistry[BlockAdapter] = TypeRegistry("block adapter")


def register_block(block_type: type[nn.Module], skippable: Callable[[nn.Module], bool]) -> None:
    """Declare ``block_type`` a residual block; ``skippable(block)`` says when it can be skipped.

    Example:
        >>> register_block(MyBlock, lambda block: block.shortcut is None)
    """
    BLOCKS.register(block_type, BlockAdapter(skippable))


def _always(block: nn.Module) -> bool:
    return True


register_block(resnet.BasicBlock, lambda b: b.downsample is None)
register_block(resnet.Bottleneck, lambda b: b.downsample is None)
register_block(mobilenetv2.InvertedResidual, lambda b: bool(b.use_res_connect))
register_block(mobilenetv3.InvertedResidual, lambda b: bool(b.use_res_connect))
register_block(efficientnet.MBConv, lambda b: bool(b.use_res_connect))
register_block(efficientnet.FusedMBConv, lambda b: bool(b.use_res_connect))
register_block(mnasnet._InvertedResidual, lambda b: bool(b.apply_residual))
register_block(convnext.CNBlock, _always)
register_block(regnet.ResBottleneckBlock, lambda b: b.proj is None)
register_block(vision_transformer.EncoderBlock, _always)
register_block(swin_transformer.SwinTransformerBlock, _always)


def _walk(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules by plain name, looking through wrappers, in definition order."""
    seen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if getattr(module, "nnobf_wrapper", False):
            continue
        seen.setdefault(unwrapped_name(name), module)
    return list(seen.items())


def skippable_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Blocks of ``model`` that a tier may skip, by module name, in definition order."""
    found: dict[str, nn.Module] = {}
    for name, module in _walk(model):
        adapter = BLOCKS.lookup(module)
        if adapter is not None and adapter.skippable(module):
            found[name] = module
    return found


def slimmable_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Blocks or hidden layers of ``model`` that a tier may run with fewer channels (not the model
    itself: a block is wrapped in place inside its parent)."""
    return {
        name: module for name, module in _walk(model) if name and slimmer_for(module) is not None
    }


def stage_of(model: nn.Module, name: str, host: Host | None = None) -> str:
    """The stage a block belongs to: its nearest enclosing sequence of several blocks.

    ``"layer3"`` for ResNet's ``"layer3.1"``; ``"encoder.layers"`` for a ViT MLP
    ``"encoder.layers.encoder_layer_0.mlp"``.
    """
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        module = host.get(prefix) if host is not None else model.get_submodule(prefix)
        if isinstance(module, nn.Sequential | nn.ModuleList) and len(module) > 1:
            return prefix
    return name.rpartition(".")[0] or name


class TieredBlock(nn.Module):
    """A block that is skipped, slimmed or run whole depending on the active tier.

    Strategies add rules: ``skip_rules[name](tier) -> bool`` and ``keep_rules[name](tier) ->
    share of hidden channels``; the rules read the tiers' calibrated settings.

    Args:
        base_block: the user's block, kept as ``base_block``.
        context: the tiered model's tier context.
        cache: the tiered model's bounded cache of derived tensors (slimmed weights).
    """

    def __init__(
        self, base_block: nn.Module, context: TierContext, cache: DerivedCache | None = None
    ) -> None:
        super().__init__()
        self.base_block = base_block
        self._context = context
        self.slimmer: Slimmer | None = slimmer_for(base_block, cache)
        self.skip_rules: dict[str, Callable[[str], bool]] = {}
        self.keep_rules: dict[str, Callable[[str], float]] = {}

    def keep(self, tier: str) -> float:
        """The share of hidden channels this block runs with at ``tier``."""
        return min((rule(tier) for rule in self.keep_rules.values()), default=1.0)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        tier = self._context.current
        if tier is not None:
            if any(rule(tier) for rule in self.skip_rules.values()):
                return x
            keep = self.keep(tier)
            if keep < 1.0 and self.slimmer is not None:
                return self.slimmer.forward(x, tier, keep)
        return self.base_block(x, *args, **kwargs)


def wrap_block(host: Host, name: str) -> TieredBlock:
    """Wrap the block called ``name`` as a :class:`TieredBlock` (once) and return it."""
    wrapper = host.wrap(name, lambda child: TieredBlock(child, host.context, host.cache))
    if not isinstance(wrapper, TieredBlock):
        raise ValueError(f"{name!r} is wrapped as a {type(wrapper).__name__}, not a block")
    return wrapper


@torch.inference_mode()
def collect_statistics(
    run_clean: Callable[[Any], Any], slimmers: dict[str, Slimmer], batches: list[Any]
) -> None:
    """Measure each slimmer's hidden activation (mean, std per channel) on ``batches``."""
    sums: dict[tuple[str, int], list[Any]] = {}

    def hook_for(name: str, space: int, activation: Callable, axis: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            act = activation(output).float().movedim(axis, -1)  # channels last
            flat = act.reshape(-1, act.shape[-1])
            acc = sums.setdefault((name, space), [0, 0.0, 0.0])
            acc[0] += flat.shape[0]
            acc[1] = acc[1] + flat.sum(0)
            acc[2] = acc[2] + (flat * flat).sum(0)

        return hook

    handles = [
        module.register_forward_hook(hook_for(name, space, activation, axis))
        for name, slimmer in slimmers.items()
        for space, (module, activation, axis) in enumerate(slimmer.spaces())
    ]
    try:
        for batch in batches:
            run_clean(batch)
    finally:
        for handle in handles:
            handle.remove()
    for name, slimmer in slimmers.items():
        stats = []
        for space in range(len(slimmer.spaces())):
            if (name, space) not in sums:  # never ran on this data: keep the estimate
                break
            count, total, squares = sums[(name, space)]
            mean = total / count
            stats.append((mean, (squares / count - mean * mean).clamp_min(0).sqrt()))
        else:
            slimmer.set_statistics(stats)
