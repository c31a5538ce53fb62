"""In-place wrapping of a user's model (PEFT style): the tier context, tiered layers, the host.

A :class:`TieredLayer` replaces one layer of the user's model; the original stays reachable as
``base_layer`` and runs untouched (bit-exact) when no tier, or a tier no strategy changes, is
active. Which layer types can be wrapped, and how each runs with a substituted weight, is a
registry of :class:`LayerAdapter` keyed by module type (``Conv1d/2d/3d``, ``Linear``,
``MultiheadAttention`` out of the box); :func:`register_layer_adapter` adds others.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nnobfuscator.registry import TypeRegistry
from nnobfuscator.tiers import Tier

_contexts = itertools.count()


class TierContext:
    """Carries the tier of the forward pass in flight down to the wrapped modules.

    Backed by a ``ContextVar``: concurrent forwards in other threads or asyncio tasks each see
    their own tier, so no request ever sees another's.
    """

    def __init__(self) -> None:
        self._var: ContextVar[str | None] = ContextVar(
            f"nnobf_tier_{next(_contexts)}", default=None
        )

    @property
    def current(self) -> str | None:
        return self._var.get()

    @contextmanager
    def activate(self, tier: str | None) -> Iterator[None]:
        token = self._var.set(tier)
        try:
            yield
        finally:
            self._var.reset(token)


# --- layer adapters ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerAdapter:
    """How a layer type runs with another weight.

    Args:
        weight: name of the parameter strategies transform; its axis 1 holds the input features.
        forward: ``forward(module, weight, *args, **kwargs)``: the module's forward with ``weight``
            in place of its own.
        accepts: whether a given instance can be wrapped (e.g. not a depthwise convolution).
    """

    weight: str
    forward: Callable[..., Any]
    accepts: Callable[[nn.Module], bool] = lambda module: True


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


for _type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer_adapter(_type, LayerAdapter("weight", _conv, _not_depthwise))
register_layer_adapter(nn.Linear, LayerAdapter("weight", _linear))
register_layer_adapter(
    nn.MultiheadAttention,
    LayerAdapter("in_proj_weight", _attention, lambda m: bool(m._qkv_same_embed_dim)),
)


# --- tiered layer --------------------------------------------------------------------------------
class WeightTransform(Protocol):
    """What a layer strategy gives a :class:`TieredLayer`."""

    def signature(self, tier: str) -> Any:
        """What the transformed weight depends on at ``tier`` (``None``: unchanged)."""

    def transform_weight(self, layer: str, weight: torch.Tensor, tier: str) -> torch.Tensor:
        """The weight of ``layer`` at ``tier``."""


class TieredLayer(nn.Module):
    """A layer whose weight depends on the active tier; the original is ``base_layer``.

    Per-tier weights are computed on first use and cached with the signature of the parameters
    they were built from, so a changed strength is picked up without manual invalidation.
    """

    def __init__(self, base_layer: nn.Module, context: TierContext, name: str) -> None:
        super().__init__()
        adapter = layer_adapter(base_layer)
        if adapter is None:
            raise ValueError(
                f"layer {name!r} ({type(base_layer).__name__}) cannot be tiered: register a "
                "LayerAdapter for its type, or pick other target layers"
            )
        self.base_layer = base_layer
        self.layer_name = name
        self.adapter = adapter
        self._context = context
        self.transforms: dict[str, WeightTransform] = {}
        self._weights: dict[str, tuple[Any, torch.Tensor | None]] = {}

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped layer; its weight reads as the active tier's.

        Modules that read a child's weight directly (Swin's attention calls ``F.linear`` with
        ``self.qkv.weight``) then see the tier's weight, exactly as a call would.
        """
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_layer", "adapter", "_context"}:
                raise
        if name == self.adapter.weight:
            tier = self._context.current
            weight = None if tier is None else self.tier_weight(tier)
            if weight is not None:
                return weight
        return getattr(self.base_layer, name)

    @property
    def base_weight(self) -> torch.Tensor:
        return getattr(self.base_layer, self.adapter.weight)

    def tier_weight(self, tier: str) -> torch.Tensor | None:
        """The weight this layer uses at ``tier``, or ``None`` when it is the original one."""
        base = self.base_weight
        signature = tuple(t.signature(tier) for t in self.transforms.values())
        cached = self._weights.get(tier)
        if (
            cached is not None
            and cached[0] == signature
            and (cached[1] is None or cached[1].device == base.device)
        ):
            return cached[1]
        result = None
        if any(s is not None for s in signature):
            # Cached weights must be ordinary tensors even when first built under inference_mode
            # (calibration), or later forwards with autograd enabled would refuse them.
            with torch.inference_mode(False), torch.no_grad():
                weight = base.detach().float()
                for sig, transform in zip(signature, self.transforms.values(), strict=True):
                    if sig is not None:
                        weight = transform.transform_weight(self.layer_name, weight, tier)
                result = weight.to(base.dtype).contiguous()
        self._weights[tier] = (signature, result)
        return result

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tier = self._context.current
        weight = None if tier is None else self.tier_weight(tier)
        if weight is None:
            return self.base_layer(*args, **kwargs)
        return self.adapter.forward(self.base_layer, weight, *args, **kwargs)


# --- the host: in-place replacement and its undo ------------------------------------------------
class Host:
    """Replaces modules of ``root`` in place and puts the originals back on :meth:`unload`.

    Strategies attach through it: it gives them the model (``root``), the tier context and the
    tiers (the one owner of calibrated parameters).
    """

    def __init__(self, root: nn.Module, context: TierContext, tiers: Mapping[str, Tier]) -> None:
        self.root = root
        self.context = context
        self.tiers = tiers
        self.wrappers: dict[str, nn.Module] = {}
        self._restore: list[tuple[nn.Module, str, nn.Module]] = []

    def wrap(self, name: str, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Replace the module called ``name`` with ``make(module)`` (once) and return the wrapper."""
        if name in self.wrappers:
            return self.wrappers[name]
        parent_name, _, child_name = name.rpartition(".")
        parent = self.get(parent_name)
        child = getattr(parent, child_name)
        if getattr(child, "nnobf_wrapper", False):
            raise ValueError(
                f"module {name!r} is already wrapped by another TieredModel: call its unload() "
                "first, or pass a fresh instance of the model"
            )
        wrapper = make(child)
        wrapper.nnobf_wrapper = True
        setattr(parent, child_name, wrapper)
        self._restore.append((parent, child_name, child))
        self.wrappers[name] = wrapper
        return wrapper

    def get(self, name: str) -> nn.Module:
        """The module called ``name`` (a plain name, looking through this host's wrappers)."""
        module = self.root
        for part in name.split(".") if name else []:
            module = unwrap(getattr(module, part)) if part else module
        return unwrap(module)

    def wrap_layer(self, name: str) -> TieredLayer:
        """Wrap the layer called ``name`` as a :class:`TieredLayer` (once) and return it."""
        wrapper = self.wrap(name, lambda child: TieredLayer(child, self.context, name))
        if not isinstance(wrapper, TieredLayer):
            raise ValueError(f"{name!r} is wrapped as a {type(wrapper).__name__}, not a layer")
        return wrapper

    def unload(self) -> nn.Module:
        """Put every original module back and return ``root``, exactly as it was."""
        for parent, child_name, original in reversed(self._restore):
            setattr(parent, child_name, original)
        self._restore.clear()
        self.wrappers.clear()
        return self.root


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside a wrapper (the module itself when it is not wrapped)."""
    while getattr(module, "nnobf_wrapper", False):
        inner = getattr(module, "base_layer", None)
        module = inner if inner is not None else module.base_block
    return module


def unwrapped_name(name: str) -> str:
    """A module name without the wrappers' ``base_layer`` / ``base_block`` steps."""
    return name.replace(".base_layer", "").replace(".base_block", "")
