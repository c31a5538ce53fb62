"""In-place wrapping of a user's model (PEFT style): tiered layers and the host.

A :class:`TieredLayer` replaces one layer of the user's model; the original stays reachable as
``base_layer`` and runs untouched (bit-exact) when no tier, or a tier no strategy changes, is
active. Which layer types can be wrapped, and how each runs with a substituted weight:
:mod:`nnobfuscator.core.layer_adapters`; what a pass knows about its tiers:
:mod:`nnobfuscator.core.tier_pass`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from nnobfuscator.core.layer_adapters import (  # the adapters lived here before 0.6
    LayerAdapter,  # noqa: F401
    layer_adapter,
    register_layer_adapter,  # noqa: F401
)
from nnobfuscator.core.tier_pass import (
    DerivedCache,
    MixedPassUnsupported,
    TierContext,
    TierPass,
    tensor_identity,
)
from nnobfuscator.core.tiers import Tier


# --- tiered layer --------------------------------------------------------------------------------
class WeightTransform(Protocol):
    """What a layer strategy gives a :class:`TieredLayer`.

    A strategy that can also act on the layer's input activation (``transform_activation``) is
    applied there, per sample, with no weight copy; one that cannot is folded into the weight.
    """

    def strength(self, tier: str) -> float:
        """The strength at ``tier`` (0: unchanged)."""

    def signature(self, tier: str) -> Any:
        """What the transformed weight depends on at ``tier`` (``None``: unchanged)."""

    def transform_weight(self, layer: str, weight: torch.Tensor, tier: str) -> torch.Tensor:
        """The weight of ``layer`` at ``tier``."""


def acts_on_activations(transform: Any) -> bool:
    """Whether ``transform`` changes a layer's input activation rather than its weight."""
    return callable(getattr(transform, "transform_activation", None))


class TieredLayer(nn.Module):
    """A layer whose input or weight depends on the tier of each sample; the original is
    ``base_layer``.

    Strategies that act on activations (feature mixing) transform the layer's input with one
    strength per sample, so one pass serves a batch mixing tiers and no per-tier weight exists.
    Others are folded into a weight per tier, kept in the model's bounded :class:`DerivedCache`.
    Where acting on the input would cost over ``FOLD_ABOVE`` of the layer's own work (a narrow
    layer: a small weight), a pass at one tier folds it into the weight instead.
    """

    FOLD_ABOVE = 0.25

    def __init__(
        self,
        base_layer: nn.Module,
        context: TierContext,
        name: str,
        cache: DerivedCache | None = None,
    ) -> None:
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
        self._cache = cache if cache is not None else DerivedCache(0)
        self.transforms: dict[str, WeightTransform] = {}
        self._fold_cheaper: bool | None = None

    @property
    def folding_is_cheaper(self) -> bool:
        """Whether the strategies that act on inputs would cost over ``FOLD_ABOVE`` of this
        layer's work there and the model's cache granted room for its folded weight at every
        tier (then a one-tier pass uses a folded weight; decided once)."""
        if self._fold_cheaper is None:
            layer = self.adapter.macs_per_input
            acting = [t for t in self.transforms.values() if acts_on_activations(t)]
            extra = sum(
                t.activation_macs(self.layer_name)  # type: ignore[attr-defined]
                for t in acting
                if callable(getattr(t, "activation_macs", None))
            )
            base = self.base_weight
            self._fold_cheaper = bool(
                acting
                and layer is not None
                and extra > self.FOLD_ABOVE * layer(self.base_layer)
                and self._cache.reserve(base.numel() * base.element_size())
            )
        return self._fold_cheaper

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped layer; its weight reads as the active tier's.

        Modules that read a child's weight directly (Swin's attention calls ``F.linear`` with
        ``self.qkv.weight``) then see the tier's weight, exactly as a call would; such a read in a
        pass mixing tiers raises :class:`MixedPassUnsupported` (the executor then groups by tier).
        """
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_layer", "adapter", "_context", "_cache"}:
                raise
        if name == self.adapter.weight:
            state = self._context.state
            if state is not None:
                self._refuse_mixed(state)
                weight = None if state.lead is None else self.tier_weight(state.lead, fold_all=True)
                if weight is not None:
                    return weight
        return getattr(self.base_layer, name)

    @property
    def base_weight(self) -> torch.Tensor:
        return getattr(self.base_layer, self.adapter.weight)

    def _weight_key(self, tier: str, fold_all: bool) -> tuple[list, tuple, tuple]:
        transforms = [t for t in self.transforms.values() if fold_all or not acts_on_activations(t)]
        signature = tuple(t.signature(tier) for t in transforms)
        key = ("weight", id(self), tier, signature, tensor_identity(self.base_weight))
        return transforms, signature, key

    def tier_weight(self, tier: str, *, fold_all: bool = False) -> torch.Tensor | None:
        """The weight this layer uses at ``tier``, or ``None`` when it is the original one.

        Args:
            fold_all: fold in the strategies that act on activations too (for sealed weights and
                direct weight reads); by default only those that cannot act on activations.
        """
        transforms, signature, key = self._weight_key(tier, fold_all)
        if all(s is None for s in signature):
            return None
        base = self.base_weight

        def fold() -> torch.Tensor:
            # Weights must be ordinary tensors even when first built under inference_mode
            # (calibration), or later forwards with autograd enabled would refuse them.
            with torch.inference_mode(False), torch.no_grad():
                weight = base.detach().float()
                for sig, transform in zip(signature, transforms, strict=True):
                    if sig is not None:
                        weight = transform.transform_weight(self.layer_name, weight, tier)
                return weight.to(base.dtype).contiguous()

        return self._cache.get(key, fold)

    def transform_activation(
        self,
        x: torch.Tensor,
        feature_axis: int,
        batch_axis: int | None,
        channels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x``, an input of this layer, as the samples' tiers in the pass in flight see it.

        Args:
            channels: the input features ``x`` holds, when a slimmed block runs with a subset.

        Raises:
            MixedPassUnsupported: per-sample strengths but no batch axis of the pass's size.
        """
        state = self._context.state
        if state is None:
            return x
        for transform in self.transforms.values():
            if not acts_on_activations(transform):
                continue
            strength = state.strength(transform)
            if isinstance(strength, torch.Tensor):
                if batch_axis is None or x.shape[batch_axis] != len(strength):
                    raise MixedPassUnsupported(
                        f"{self.layer_name}: input {tuple(x.shape)} has no batch axis of "
                        f"{len(strength)} samples"
                    )
                shape = [1] * x.dim()
                shape[batch_axis] = -1
                strength = strength.to(x.device, x.dtype).view(shape)
            elif strength == 0.0:
                continue
            x = transform.transform_activation(  # type: ignore[attr-defined]
                self.layer_name, x, strength, feature_axis, channels
            )
        return x

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self._context.state
        if state is None:
            return self.base_layer(*args, **kwargs)
        fold_all = self.adapter.map_inputs is None
        if fold_all:
            self._refuse_mixed(state)
        elif state.rows is None and state.lead is not None and self.folding_is_cheaper:
            fold_all = True
        elif any(acts_on_activations(t) for t in self.transforms.values()):
            args, kwargs = self.adapter.map_inputs(
                self.base_layer,
                lambda x, feature, batch: self.transform_activation(x, feature, batch),
                args,
                kwargs,
            )
        weight = None if state.lead is None else self.tier_weight(state.lead, fold_all=fold_all)
        if weight is None:
            return self.base_layer(*args, **kwargs)
        return self.adapter.forward(self.base_layer, weight, *args, **kwargs)

    def _refuse_mixed(self, state: TierPass) -> None:
        """Raise :class:`MixedPassUnsupported` when samples of ``state`` need different weights."""
        if state.rows is not None and any(
            isinstance(state.strength(t), torch.Tensor) for t in self.transforms.values()
        ):
            raise MixedPassUnsupported(
                f"{self.layer_name}: its weight would differ per sample in a mixed-tier pass"
            )


# --- the host: in-place replacement and its undo ------------------------------------------------
class Host:
    """Replaces modules of ``root`` in place and puts the originals back on :meth:`unload`.

    Strategies attach through it: it gives them the model (``root``), the tier context and the
    tiers (the one owner of calibrated parameters).
    """

    #: derived tensors (folded, sliced) a host keeps, as a share of the model's own bytes
    CACHE_SHARE = 0.03

    def __init__(self, root: nn.Module, context: TierContext, tiers: Mapping[str, Tier]) -> None:
        self.root = root
        self.context = context
        self.tiers = tiers
        self.cache = DerivedCache(lambda: int(self.CACHE_SHARE * module_bytes(self.root)), tiers)
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
        wrapper = self.wrap(name, lambda child: TieredLayer(child, self.context, name, self.cache))
        if not isinstance(wrapper, TieredLayer):
            raise ValueError(f"{name!r} is wrapped as a {type(wrapper).__name__}, not a layer")
        return wrapper

    def unload(self) -> nn.Module:
        """Put every original module back and return ``root``, exactly as it was."""
        for parent, child_name, original in reversed(self._restore):
            setattr(parent, child_name, original)
        self._restore.clear()
        self.wrappers.clear()
        self.cache.clear()
        return self.root


class ChannelsLastMaxPool(nn.Module):
    """A 2-D max-pooling layer run in channels-last memory on the CPU, its output handed back in
    the default layout.

    The maximum is exact in any layout (the same values, bit for bit), and torch's CPU kernel for
    the default layout is 2.5-5x slower (``benchmarks/RESULTS.md``): with it, pooling was a fifth of
    a cheap tier's time. Other devices and layouts go straight through.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or not x.is_contiguous():
            return self.base_layer(x)
        pooled = self.base_layer(x.contiguous(memory_format=torch.channels_last))
        # a copy with the default strides even where size-1 dimensions make both layouts count
        # as contiguous (the next layer picks its kernel by strides)
        return pooled.clone(memory_format=torch.contiguous_format)


def wrap_max_pooling(host: Host) -> None:
    """Run every plain ``nn.MaxPool2d`` of the host's model channels-last on the CPU (exact)."""
    for name, module in list(host.root.named_modules()):
        if (
            isinstance(module, nn.MaxPool2d)
            and type(module).forward is nn.MaxPool2d.forward
            and not module.return_indices
        ):
            host.wrap(unwrapped_name(name), ChannelsLastMaxPool)


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside a wrapper (the module itself when it is not wrapped)."""
    while getattr(module, "nnobf_wrapper", False):
        inner = getattr(module, "base_layer", None)
        module = inner if inner is not None else module.base_block
    return module


def unwrapped_name(name: str) -> str:
    """A module name without the wrappers' ``base_layer`` / ``base_block`` steps."""
    return name.replace(".base_layer", "").replace(".base_block", "")


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    seen: dict[int, int] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
