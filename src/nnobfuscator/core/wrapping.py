"""In-place wrapping of a user's model (PEFT style): the tier context, tiered layers, the host.

A :class:`TieredLayer` replaces one layer of the user's model; the original stays reachable as
``base_layer`` and runs untouched (bit-exact) when no tier, or a tier no strategy changes, is
active. Which layer types can be wrapped, and how each runs with a substituted weight, is a
registry of :class:`LayerAdapter` keyed by module type (``Conv1d/2d/3d``, ``Linear``,
``MultiheadAttention`` out of the box); :func:`register_layer_adapter` adds others.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nnobfuscator.core.registry import TypeRegistry
from nnobfuscator.core.tiers import Tier

_contexts = itertools.count()


class MixedPassUnsupported(RuntimeError):
    """A forward pass that serves samples at different tiers reached a place that cannot tell
    samples apart (a layer whose weight is read directly, an activation without a batch axis);
    the executor then runs the tiers one group at a time."""


def pass_of(rows: tuple[str | None, ...]) -> tuple[str | None, tuple[str | None, ...] | None]:
    """``(lead, rows)`` of a pass serving ``rows``, one active tier per sample (``None``: the
    untouched model): a single tier needs no per-sample rows; else the lead is the first tier."""
    if len(set(rows)) == 1:
        return rows[0], None
    return next(tier for tier in rows if tier is not None), rows


@dataclass
class TierPass:
    """The tiers of one forward pass.

    Args:
        lead: the tier whose compute setting (and weight-folding strategies) is in force; ``None``
            runs the untouched model.
        rows: for a pass that serves a batch mixing tiers, the tier of each sample (``None`` for a
            sample at the untouched model); ``None`` when every sample is at ``lead``.
    """

    lead: str | None
    rows: tuple[str | None, ...] | None = None
    _strengths: dict[int, float | torch.Tensor] = field(default_factory=dict, repr=False)
    _groups: tuple[tuple[str | None, ...], torch.Tensor] | None = field(default=None, repr=False)

    def groups(self) -> tuple[tuple[str | None, ...], torch.Tensor]:
        """The distinct tiers of ``rows`` (in order of first appearance) and, per sample, the
        index of its tier among them (``lead`` alone when ``rows`` is ``None``)."""
        if self._groups is None:
            rows = self.rows if self.rows is not None else (self.lead,)
            tiers = tuple(dict.fromkeys(rows))
            position = {tier: index for index, tier in enumerate(tiers)}
            self._groups = tiers, torch.tensor([position[tier] for tier in rows])
        return self._groups

    def strength(self, transform: Any) -> float | torch.Tensor:
        """``transform``'s strength in this pass: a number, or one per sample for mixed rows."""
        memo = self._strengths.get(id(transform))
        if memo is None:
            if self.rows is None:
                memo = transform.strength(self.lead) if self.lead is not None else 0.0
            else:
                values = [transform.strength(t) if t is not None else 0.0 for t in self.rows]
                memo = torch.tensor(values) if len(set(values)) > 1 else values[0]
            self._strengths[id(transform)] = memo
        return memo


class TierContext:
    """Carries the tier(s) of the forward pass in flight down to the wrapped modules.

    Backed by a ``ContextVar``: concurrent forwards in other threads or asyncio tasks each see
    their own pass, so no request ever sees another's.
    """

    def __init__(self) -> None:
        self._var: ContextVar[TierPass | None] = ContextVar(
            f"nnobf_tier_{next(_contexts)}", default=None
        )

    @property
    def state(self) -> TierPass | None:
        """The pass in flight (``None``: the untouched model)."""
        return self._var.get()

    @property
    def current(self) -> str | None:
        """The tier whose compute setting is in force (``None``: the untouched model)."""
        state = self._var.get()
        return None if state is None else state.lead

    @contextmanager
    def activate(
        self, tier: str | None, rows: tuple[str | None, ...] | None = None
    ) -> Iterator[None]:
        """Run at ``tier``; ``rows`` gives each sample its own tier (sharing ``tier``'s compute
        setting)."""
        token = self._var.set(None if tier is None and rows is None else TierPass(tier, rows))
        try:
            yield
        finally:
            self._var.reset(token)


class DerivedCache:
    """Tensors derived from the user's weights (folded or sliced per tier), bounded in bytes.

    The least recently used entries leave first; a miss recomputes. The bound keeps a tiered model
    near the size of one model however many tiers it has.

    Args:
        budget: the most bytes held, or a function giving it (evaluated on first use).
    """

    def __init__(self, budget: int | Callable[[], int], tiers: Mapping[str, Any] | None = None):
        self._budget = budget
        self._entries: OrderedDict[Any, tuple[int, Any]] = OrderedDict()
        self.nbytes = 0
        #: the model's tiers (how many a derived tensor may be kept for)
        self.tiers = tiers or {}
        self.reserved = 0
        self._lock = threading.Lock()  # forwards may run in several threads (serving lanes)

    def reserve(self, nbytes_per_tier: int) -> bool:
        """Reserve room for a derived tensor at every tier (up to half the budget, first come);
        whether it was granted. A grant is a fixed decision, so outputs never depend on what the
        cache holds at the time of a call."""
        total = nbytes_per_tier * max(1, len(self.tiers))
        with self._lock:
            if self.reserved + total > self.budget // 2:
                return False
            self.reserved += total
            return True

    @property
    def budget(self) -> int:
        if callable(self._budget):
            self._budget = int(self._budget())
        return self._budget

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        """The entry for ``key``, made with ``make()`` on a miss (kept while the budget allows)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[1]
        value = make()
        size = tensor_bytes(value)
        budget = self.budget
        with self._lock:
            if size <= budget and key not in self._entries:
                while self._entries and self.nbytes + size > budget:
                    _, (freed, _) = self._entries.popitem(last=False)
                    self.nbytes -= freed
                self._entries[key] = (size, value)
                self.nbytes += size
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0
            self.reserved = 0


def tensor_identity(tensor: torch.Tensor) -> tuple:
    """Storage, device and in-place version of ``tensor``: what a derived tensor depends on."""
    try:
        version = tensor._version
    except RuntimeError:  # inference tensors keep no version (they cannot change in place)
        version = -1
    return tensor.data_ptr(), tensor.device, version


def ordinary(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as an ordinary tensor, detached: calibrated state measured under
    ``torch.inference_mode`` must not refuse later calls that run with autograd on."""
    if tensor.is_inference():
        with torch.inference_mode(False):
            return tensor.clone()
    return tensor.detach()


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or nested tuples, lists and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, tuple | list):
        return sum(tensor_bytes(v) for v in value)
    return 0


# --- layer adapters ------------------------------------------------------------------------------
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
