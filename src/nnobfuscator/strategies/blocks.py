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

from nnobfuscator.core.registry import TypeRegistry
from nnobfuscator.core.tier_pass import (
    DerivedCache,
    MixedPassUnsupported,
    TierContext,
    TierPass,
    ordinary,
    pass_of,
)
from nnobfuscator.core.wrapping import Host, unwrapped_name
from nnobfuscator.strategies.slim_layers import reader_input
from nnobfuscator.strategies.slimmers import Slimmer
from nnobfuscator.strategies.slimming import slimmer_for


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
    """Blocks of ``model`` that a tier may skip, by module name, in definition order: registered
    block types (:func:`register_block`) and the layers of transformer stacks
    (:func:`stack_layers`)."""
    modules = _walk(model)
    stacked = stack_layers(dict(modules))
    found: dict[str, nn.Module] = {}
    for name, module in modules:
        adapter = BLOCKS.lookup(module)
        if adapter is not None:
            if adapter.skippable(module):
                found[name] = module
        elif name in stacked:
            found[name] = module
    return found


def stack_layers(modules: dict[str, nn.Module]) -> set[str]:
    """The layers of transformer stacks, found by structure (no class names): the modules of an
    ``nn.ModuleList`` of two or more modules of one type, each holding an attention (a child
    named like ``attn`` or ``attention`` with linear projections) and an MLP (another child with
    two ``nn.Linear`` or more). Such a layer adds its attention's and its MLP's output to its
    input (``x + f(x)``), so skipping it returns its input.

    The first layer of each stack is left out: a decoder's key-value cache reads its length
    there, and it is the layer a model can least do without.
    """
    found: set[str] = set()
    for name, module in modules.items():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        children = [modules.get(f"{name}.{i}" if name else str(i)) for i in range(len(module))]
        if any(child is None for child in children):
            continue
        if len({type(child) for child in children}) != 1 or not _is_stack_layer(children[0]):
            continue
        found.update(f"{name}.{i}" if name else str(i) for i in range(1, len(children)))
    return found


def _is_stack_layer(module: nn.Module) -> bool:
    attention = mlp = False
    for child_name, child in module.named_children():
        linears = sum(isinstance(m, nn.Linear) for m in child.modules())
        is_attention = any(word in child_name.lower() for word in ("attn", "attention"))
        if is_attention and (
            linears >= 3 or any(isinstance(m, nn.MultiheadAttention) for m in child.modules())
        ):
            attention = True
        elif not is_attention and linears >= 2:
            mlp = True
    return attention and mlp


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

    In a pass mixing tiers it runs only on the samples whose tier keeps it (the others pass
    through unrun), so tiers that differ only in the blocks they skip share one pass.

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
        #: per batch of tiers and widths, the lead tier and the hidden units each sample holds
        self._joint_plans: dict[tuple, tuple[str | None, torch.Tensor]] = {}

    def keep(self, tier: str) -> float:
        """The share of hidden channels this block runs with at ``tier``."""
        return min((rule(tier) for rule in self.keep_rules.values()), default=1.0)

    def skips(self, tier: str | None) -> bool:
        """Whether ``tier`` skips this block (``None``: the untouched model never does)."""
        return tier is not None and any(rule(tier) for rule in self.skip_rules.values())

    def slimming(self, tier: str | None) -> tuple:
        """How this block is slimmed at ``tier`` (equal for tiers that share its slices)."""
        keep = 1.0 if tier is None else self.keep(tier)
        if keep >= 1.0 or self.slimmer is None:
            return (1.0,)
        keeps = getattr(self.slimmer, "keeps", None)
        return (keep, keeps(tier, keep) if callable(keeps) else None)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        state = self._context.state
        if state is not None and state.rows is not None:
            return self._routed(state, x, args, kwargs)
        tier = None if state is None else state.lead
        if self.skips(tier):
            return x
        return self._run(tier, x, args, kwargs)

    def _run(self, tier: str | None, x: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The block at ``tier``'s width (slimmed or whole)."""
        if tier is not None and self.slimmer is not None:
            keep = self.keep(tier)
            if keep < 1.0:
                return self.slimmer.forward(x, tier, keep)
        return self.base_block(x, *args, **kwargs)

    def _routed(self, state: TierPass, x: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The block in a pass mixing tiers: run only on the samples whose tier keeps it, once
        per width among them (each group of samples through its own slices).

        Raises:
            MixedPassUnsupported: the call cannot be split by sample (no leading batch axis,
                tensor arguments without one), or the block's output is not shaped like its
                input.
        """
        tiers, index = state.groups()
        skipping = [self.skips(tier) for tier in tiers]
        if all(skipping):
            return x
        widths: dict[tuple, list[int]] = {}
        for position, (tier, skip) in enumerate(zip(tiers, skipping, strict=True)):
            if not skip:
                widths.setdefault(self.slimming(tier), []).append(position)
        if not any(skipping) and len(widths) == 1:
            return self._run(state.lead, x, args, kwargs)
        rows = state.rows or ()
        name = type(self.base_block).__name__
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != len(rows):
            raise MixedPassUnsupported(f"{name}: no batch axis to split")
        if hasattr(self.slimmer, "forward_held") and not any(skipping) and not args and not kwargs:
            # one run at full width, each sample's dropped units held at their mean: the
            # weights are read once, not once per width (planned once per batch and setting)
            key = (rows, tuple(widths), x.device, self.slimmer._version)  # type: ignore[union-attr]
            plan = self._joint_plans.get(key)
            if plan is None:
                widths_of = [
                    (
                        1.0 if tiers[positions[0]] is None else self.keep(tiers[positions[0]]),
                        torch.isin(index, torch.tensor(positions))
                        .nonzero()
                        .squeeze(1)
                        .to(x.device),
                    )
                    for positions in widths.values()
                ]
                held = self.slimmer.held_units(widths_of, len(rows), x.device)  # type: ignore[union-attr]
                plan = (next((t for t in tiers if t is not None), None), held)
                if len(self._joint_plans) >= 8:
                    self._joint_plans.clear()
                self._joint_plans[key] = plan
            return self.slimmer.forward_held(x, *plan)  # type: ignore[union-attr]
        out = x
        for positions in widths.values():
            kept = torch.isin(index, torch.tensor(positions)).nonzero().squeeze(1)
            lead, sub_rows = pass_of(tuple(rows[i] for i in kept.tolist()))
            kept = kept.to(x.device)
            part_args = tuple(_rows_of(v, kept, len(rows), name) for v in args)
            part_kwargs = {k: _rows_of(v, kept, len(rows), name) for k, v in kwargs.items()}
            with self._context.activate(lead, sub_rows):
                part = self._run(lead, x.index_select(0, kept), part_args, part_kwargs)
            if not isinstance(part, torch.Tensor) or part.shape[1:] != x.shape[1:]:
                raise MixedPassUnsupported(f"{name}: output is not x-shaped")
            out = out.index_copy(0, kept, part.to(x.dtype))
        return out


def _rows_of(value: Any, rows: torch.Tensor, count: int, block: str) -> Any:
    """``value``, a further argument of a block called on a batch of ``count`` samples, for the
    samples ``rows``: a tensor of two axes or more whose first is the batch (an attention mask,
    position embeddings: a tuple of them) is cut to them; one whose first axis is 1 is shared
    by every sample, and so is a value that holds no tensor (a key-value cache, which each layer
    updates with the samples that run it, the same ones at every step of a generation).

    Raises:
        MixedPassUnsupported: a tensor that cannot be told apart from a batch (one axis as long
            as the batch, or a first axis of another length).
    """
    if isinstance(value, tuple | list):
        return type(value)(_rows_of(v, rows, count, block) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.dim() >= 2 and value.shape[0] == count:
        return value.index_select(0, rows.to(value.device))
    if value.shape[0] == 1 and value.dim() >= 2:
        return value
    raise MixedPassUnsupported(f"{block}: a tensor argument of shape {tuple(value.shape)}")


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

    def pre_hook_for(name: str, space: int, axis: int):
        record = hook_for(name, space, lambda x: x, axis)
        return lambda module, args: record(module, args, args[0])

    handles = [
        module.register_forward_pre_hook(pre_hook_for(name, space, axis))
        if activation is reader_input
        else module.register_forward_hook(hook_for(name, space, activation, axis))
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
            std = (squares / count - mean * mean).clamp_min(0).sqrt()
            stats.append((ordinary(mean), ordinary(std)))
        else:
            slimmer.set_statistics(stats)
