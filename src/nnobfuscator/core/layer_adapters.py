"""Which layer types can be wrapped and how each runs with a substituted weight or transformed
input: a registry of :class:`LayerAdapter` keyed by module type (``Conv1d/2d/3d``, ``Linear``,
``MultiheadAttention`` out of the box); :func:`register_layer_adapter` adds others."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnobfuscator.core.registry import TypeRegistry

#: ``fn(tensor, feature_axis, batch_axis)``: what a strategy does to a layer's input activation
#: (``batch_axis`` is ``None`` for an unbatched input)
ActivationFn = Callable[[torch.Tensor, int, int | None], torch.Tensor]


@dataclass(frozen=True)
class LayerAdapter:
    """How a layer type runs with another weight, or with transformed inputs.

    Args:
        weight: name of the parameter strategies transform; its axis 1 holds the input features.
        forward: ``forward(module, weight, *args, **kwargs)``: the module's forward with ``weight``
            in place of its own.
        map_inputs: ``map_inputs(module, fn, args, kwargs) -> (args, kwargs)``: the call with
            ``fn`` applied to every input the weight's axis 1 reads. Without it, strategies that
            act on activations are folded into the weight (and tiers do not share a pass).
        accepts: whether a given instance can be wrapped (e.g. not a depthwise convolution).
        macs_per_input: multiply-adds the layer spends per element of its input (to weigh what
            acting on the input costs against folding into the weight).
    """

    weight: str
    forward: Callable[..., Any]
    map_inputs: Callable[..., tuple[tuple, dict[str, Any]]] | None = None
    accepts: Callable[[nn.Module], bool] = lambda module: True
    macs_per_input: Callable[[nn.Module], float] | None = None


_LAYER_ADAPTERS: TypeRegistry[LayerAdapter] = TypeRegistry("layer adapter")


def register_layer_adapter(module_type: type[nn.Module], adapter: LayerAdapter) -> None:
    """Let strategies wrap layers of ``module_type`` (and its subclasses)."""
    _LAYER_ADAPTERS.register(module_type, adapter)


def layer_adapter(module: nn.Module) -> LayerAdapter | None:
    """The adapter for ``module``'s type, or ``None`` when it cannot be wrapped."""
    adapter = _LAYER_ADAPTERS.lookup(module)
    return adapter if adapter is not None and adapter.accepts(module) else None


def _conv(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return module._conv_forward(x, weight, module.bias)  # type: ignore[operator]


def _linear(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, module.bias)  # type: ignore[arg-type]


def _map_first(
    module: nn.Module, fn: ActivationFn, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """Conv and Linear: the one input; features on axis 1 (conv) or last (linear), batch first."""
    if args:
        x, rest = args[0], args[1:]
    else:
        name = "input" if "input" in kwargs else next(iter(kwargs))
        x, rest = kwargs[name], ()
    if isinstance(module, nn.Linear):
        feature, batch = -1, (0 if x.dim() > 1 else None)
    else:  # a batched conv input has one more axis than the kernel's spatial dims + channels
        batched = x.dim() == module.weight.dim()  # type: ignore[union-attr]
        feature, batch = (1, 0) if batched else (0, None)
    mapped = fn(x, feature, batch)
    return ((mapped, *rest), kwargs) if args else ((), {**kwargs, name: mapped})


def _map_attention(
    module: nn.MultiheadAttention, fn: ActivationFn, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """Query, key and value (one activation mapped once when they are the same tensor)."""
    names = ("query", "key", "value")
    values = dict(zip(names, args[:3], strict=False))
    values.update({n: kwargs[n] for n in names if n in kwargs})
    done: dict[int, torch.Tensor] = {}
    for name in names:
        x = values[name]
        if id(x) not in done:
            batch = (0 if module.batch_first else 1) if x.dim() == 3 else None
            done[id(x)] = fn(x, -1, batch)
        values[name] = done[id(x)]
    positional = min(len(args), 3)
    new_args = tuple(values[n] for n in names[:positional]) + args[3:]
    return new_args, {**kwargs, **{n: values[n] for n in names[positional:]}}


def _attention(
    module: nn.MultiheadAttention,
    weight: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nn.MultiheadAttention.forward`` with ``weight`` as its packed input projection."""
    batched = query.dim() == 3
    if module.batch_first and batched:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    output, weights = F.multi_head_attention_forward(
        query,
        key,
        value,
        module.embed_dim,
        module.num_heads,
        weight,
        module.in_proj_bias,
        module.bias_k,
        module.bias_v,
        module.add_zero_attn,
        module.dropout,
        module.out_proj.weight,
        module.out_proj.bias,
        training=module.training,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    if module.batch_first and batched:
        output = output.transpose(0, 1)
    return output, weights


def _not_depthwise(module: nn.Module) -> bool:
    """Depthwise convolutions have one input feature per filter: nothing to mix; the pointwise
    convolutions around them carry the features."""
    return not (module.groups > 1 and module.weight.shape[1] == 1)  # type: ignore[union-attr]


def _conv_macs(module: nn.Module) -> float:
    """A convolution's multiply-adds per input element: ``out * kernel / (groups * stride)``."""
    kernel = math.prod(module.kernel_size)  # type: ignore[arg-type]
    stride = math.prod(module.stride)  # type: ignore[arg-type]
    return module.out_channels * kernel / (module.groups * stride)  # type: ignore[operator]


for _type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer_adapter(
        _type, LayerAdapter("weight", _conv, _map_first, _not_depthwise, _conv_macs)
    )
register_layer_adapter(
    nn.Linear,
    LayerAdapter("weight", _linear, _map_first, macs_per_input=lambda m: float(m.out_features)),
)
register_layer_adapter(
    nn.MultiheadAttention,
    LayerAdapter(
        "in_proj_weight",
        _attention,
        _map_attention,
        lambda m: bool(m._qkv_same_embed_dim),
        lambda m: float(m.in_proj_weight.shape[0]),
    ),
)
