"""``TieredModel``: one wrapped model, many quality tiers, the tier chosen per call."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from nnobfuscator.security.keys import coerce_key, key_id
from nnobfuscator.strategies import (
    ComputeStrategy,
    Strategy,
    TierContext,
    TieredBlock,
    TieredLayer,
    get_strategy,
    list_strategies,
)
from nnobfuscator.strategies.blocks import residual_blocks
from nnobfuscator.tiers import Tier, parse_tiers


@dataclass
class InputSpec:
    """The input a model expects: ``(N, channels, height, width)``; ``None`` means any."""

    channels: int | None = None
    height: int | None = None
    width: int | None = None

    def check(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor batch, got {type(x).__name__}")
        want = f"(N, {self.channels or 'C'}, {self.height or 'H'}, {self.width or 'W'})"
        if x.dim() != 4:
            raise ValueError(f"expected a 4-d image batch {want}, got shape {tuple(x.shape)}")
        for axis, expected in ((1, self.channels), (2, self.height), (3, self.width)):
            if expected is not None and x.shape[axis] != expected:
                raise ValueError(f"expected input of shape {want}, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("empty batch: send at least one sample")


@dataclass
class ObfuscationConfig:
    """How to turn a model into a tiered model.

    Args:
        tiers: ``"free=60%,pro=85%,premium=full"``, a list or a mapping (see ``parse_tiers``).
        strategy: a registered degrading strategy, or several joined with ``+`` (``"feature-mix"``).
        compute: compute strategies that make lower tiers cheaper, joined with ``+``
            (``"block-skip+channel-slim+input-resolution"``), ``"auto"`` (those that apply to the
            architecture) or ``None`` (every tier costs what the full model costs).
        targets: module-name patterns of the layers to act on; ``None`` uses the default.
        key: the secret key (bytes or hex); ``None`` draws a new random one.
        task: ``"classification"`` (more tasks register themselves in ``nnobfuscator.tasks``).
        input_spec: the expected input; checked on every call.
        model_name: a label for reports, e.g. ``"resnet18"``.
    """

    tiers: str | list[Any] | dict[str, Any] = "free=60%,pro=85%,premium=full"
    strategy: str = "feature-mix"
    compute: str | None = None
    targets: list[str] | None = None
    key: bytes | str | None = None
    task: str = "classification"
    input_spec: InputSpec | None = None
    model_name: str = "model"
    meta: dict[str, Any] = field(default_factory=dict)


def model_fingerprint(model: nn.Module) -> str:
    """A digest of a model's weights, independent of the wrappers a TieredModel adds."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.replace(".base_layer.", ".").replace(".base_block.", ".").encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:24]


class TieredModel(nn.Module):
    """A trained model served at several quality tiers from one copy of its weights.

    The user's model is wrapped, not copied, and stays reachable as ``base_model``; target layers
    are wrapped in place (PEFT style, original kept as ``base_layer``) and :meth:`unload` undoes it.

    Call it as ``model(x, tier="free")`` or ``model(x, tiers=["free", "premium", ...])`` for a mixed
    batch. Without a tier argument the notebook default (:meth:`set_tier`, :meth:`use_tier`) is
    used, and failing that the *lowest* tier, so a forgotten argument never gives away quality.
    """

    def __init__(
        self,
        base_model: nn.Module,
        tiers: Sequence[Tier],
        strategies: Sequence[dict[str, Any]],
        key: bytes,
        *,
        task: str = "classification",
        model_name: str = "model",
        input_spec: InputSpec | None = None,
        meta: dict[str, Any] | None = None,
        base_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        if len(tiers) < 1:
            raise ValueError("a tiered model needs at least one tier")
        self.base_fingerprint = base_fingerprint or model_fingerprint(base_model)
        self.base_model = base_model
        self.key = key
        self.task = task
        self.model_name = model_name
        self.input_spec = input_spec
        self.meta = dict(meta or {})
        self.context = TierContext()
        self.tiers: dict[str, Tier] = {tier.name: tier for tier in tiers}
        self._wrapped: dict[str, TieredLayer] = {}
        self._blocks: dict[str, TieredBlock] = {}
        self._restore: list[tuple[nn.Module, str, nn.Module]] = []
        self._default_tier: str | None = None
        self._tier_override: ContextVar[str | None] = ContextVar(
            f"nnobf_use_{id(self)}", default=None
        )
        self.strategies: dict[str, Strategy] = {}
        # Degrading strategies wrap layers first, compute strategies then wrap whole blocks, so
        # layer names stay the plain module names whatever the combination.
        built = [get_strategy(dict(spec)["name"]) for spec in strategies]
        order = sorted(range(len(built)), key=lambda i: built[i].role == "compute")
        for index in order:
            spec = dict(strategies[index])
            strategy = get_strategy(spec.pop("name"))(key, **spec)
            strategy.attach(self)
            self.strategies[strategy.name] = strategy
        for tier in self.tiers.values():
            for name, params in tier.params.items():
                if name in self.strategies:
                    self.strategies[name].load_params(tier.name, params)

    # --- wrapping ----------------------------------------------------------------------------
    def _replace(self, name: str, make: Any) -> nn.Module:
        parent_name, _, child_name = name.rpartition(".")
        parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
        child = getattr(parent, child_name)
        if isinstance(child, TieredLayer | TieredBlock):
            raise ValueError(
                f"module {name!r} is already wrapped by another TieredModel: call its unload() "
                "first, or pass a fresh instance of the model"
            )
        wrapper = make(child)
        setattr(parent, child_name, wrapper)
        self._restore.append((parent, child_name, child))
        return wrapper

    def wrap_layer(self, name: str) -> TieredLayer:
        """Wrap the ``Conv2d``/``Linear`` called ``name`` in place (once) and return the wrapper."""
        if name not in self._wrapped:
            child = self.base_model.get_submodule(name)
            if not isinstance(child, nn.Conv2d | nn.Linear | TieredLayer):
                raise ValueError(
                    f"layer {name!r} is a {type(child).__name__}, not Conv2d or Linear"
                )
            self._wrapped[name] = self._replace(name, lambda c: TieredLayer(c, self.context))
        return self._wrapped[name]

    def wrap_block(self, name: str) -> TieredBlock:
        """Wrap the residual block called ``name`` in place (once) and return the wrapper."""
        if name not in self._blocks:
            if name not in residual_blocks(self.base_model) and not isinstance(
                self.base_model.get_submodule(name), TieredBlock
            ):
                raise ValueError(f"{name!r} is not a torchvision BasicBlock/Bottleneck")
            self._blocks[name] = self._replace(name, lambda c: TieredBlock(c, self.context))
        return self._blocks[name]

    def unload(self) -> nn.Module:
        """Remove every wrapper and return the original model, exactly as it was."""
        for strategy in self.strategies.values():
            strategy.detach()
        for parent, child_name, original in reversed(self._restore):
            setattr(parent, child_name, original)
        self._restore.clear()
        self._wrapped.clear()
        self._blocks.clear()
        self.strategies.clear()
        return self.base_model

    @property
    def degrading(self) -> dict[str, Strategy]:
        """The strategies that lower utility by a strength (one shared knob per tier)."""
        return {n: s for n, s in self.strategies.items() if s.role != "compute"}

    @property
    def compute(self) -> dict[str, ComputeStrategy]:
        """The strategies that make tiers cheaper by a discrete setting."""
        return {n: s for n, s in self.strategies.items() if isinstance(s, ComputeStrategy)}

    # --- tiers -------------------------------------------------------------------------------
    @property
    def tier_names(self) -> list[str]:
        """Tier names, lowest utility first."""
        return list(self.tiers)

    def get_tier(self, name: str) -> Tier:
        try:
            return self.tiers[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown tier {name!r}; this model has {self.tier_names}") from None

    def set_strength(self, tier: str, strategy: str, strength: float) -> None:
        """Set a tier's strength for one degrading strategy (what calibration does)."""
        self.strategies[strategy].set_strength(tier, strength)
        self.get_tier(tier).params.setdefault(strategy, {})["strength"] = float(strength)

    def set_setting(self, tier: str, strategy: str, setting: dict[str, Any]) -> None:
        """Set a tier's setting for one compute strategy (what calibration does)."""
        compute = self.compute
        if strategy not in compute:
            raise ValueError(
                f"{strategy!r} is not a compute strategy of this model: {list(compute)}"
            )
        compute[strategy].set_setting(tier, setting)
        self.get_tier(tier).params[strategy] = compute[strategy].setting(tier)

    def tier_strategy(self, tier: str) -> str:
        """The strategies that act at ``tier``, joined with ``+`` (``"none"`` when none does)."""
        if self.get_tier(tier).is_full:
            return "none"
        active = [n for n, s in self.strategies.items() if s.is_active(tier)]
        return "+".join(active) or "none"

    def is_calibrated(self, tier: str) -> bool:
        info = self.get_tier(tier)
        return info.is_full or all(name in info.params for name in self.strategies)

    def set_tier(self, tier: str | None) -> None:
        """Notebook convenience: the tier used when a call names none (``None`` resets)."""
        if tier is not None:
            self.get_tier(tier)
        self._default_tier = tier

    @contextmanager
    def use_tier(self, tier: str) -> Iterator[None]:
        """Notebook convenience: calls without a tier argument use ``tier`` inside the block."""
        self.get_tier(tier)
        token = self._tier_override.set(tier)
        try:
            yield
        finally:
            self._tier_override.reset(token)

    @contextmanager
    def disable_tiers(self) -> Iterator[None]:
        """Notebook convenience: calls without a tier argument run the untouched model."""
        token = self._tier_override.set("__full__")
        try:
            yield
        finally:
            self._tier_override.reset(token)

    def _resolve_tier(self, tier: str | None) -> str | None:
        chosen = tier or self._tier_override.get() or self._default_tier or self.tier_names[0]
        if chosen == "__full__":
            return None
        self.get_tier(chosen)
        return chosen

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        *args: Any,
        tier: str | None = None,
        tiers: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model at one tier, or at a tier per sample (``tiers``, one per row of ``x``)."""
        if self.input_spec is not None:
            self.input_spec.check(x)
        if tiers is None:
            return self.forward_tier(x, self._resolve_tier(tier), *args, **kwargs)
        if tier is not None:
            raise ValueError("pass either tier= (whole batch) or tiers= (one per sample), not both")
        if isinstance(tiers, str) or len(tiers) != x.shape[0]:
            raise ValueError(
                f"tiers= needs one tier name per sample: got {len(tiers)} for a batch of {x.shape[0]}"
            )
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(tiers):
            groups.setdefault(self.get_tier(name).name, []).append(index)
        if len(groups) == 1:
            return self.forward_tier(x, next(iter(groups)), *args, **kwargs)
        parts = []
        for name, indices in groups.items():
            index = torch.tensor(indices, device=x.device)
            parts.append(
                (index, self.forward_tier(x.index_select(0, index), name, *args, **kwargs))
            )
        return _scatter(parts, x.shape[0])

    def forward_tier(self, x: torch.Tensor, tier: str | None, *args: Any, **kwargs: Any) -> Any:
        """Run the whole batch at ``tier`` (``None`` or a ``full`` tier: the untouched model)."""
        if tier is None or self.tiers[tier].is_full:
            with self.context.activate(None):
                return self.base_model(x, *args, **kwargs)
        if not self.is_calibrated(tier):
            raise RuntimeError(f"tier {tier!r} is not calibrated yet: run nnobfuscator.calibrate()")
        inputs = x
        for strategy in self.strategies.values():
            inputs = strategy.transform_input(inputs, tier)
        with self.context.activate(tier):
            output = self.base_model(inputs, *args, **kwargs)
        for strategy in self.strategies.values():
            output = strategy.transform_output(output, x, tier)
        return output

    # --- status ------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """One row per tier: target, strategy, calibrated parameters, metrics, cost, layers."""
        rows = []
        for tier in self.tiers.values():
            rows.append(
                {
                    "tier": tier.name,
                    "target": tier.target.spec,
                    "target_value": tier.target_value,
                    "strategy": self.tier_strategy(tier.name),
                    "params": {} if tier.is_full else tier.params,
                    "metrics": tier.metrics,
                    "relative_cost": tier.relative_cost,
                    "calibrated": self.is_calibrated(tier.name),
                }
            )
        return rows

    def describe(self) -> dict[str, Any]:
        """Model-level facts: task, model, key id, strategies and their layers."""
        return {
            "task": self.task,
            "model": self.model_name,
            "key_id": key_id(self.key),
            "base_fingerprint": self.base_fingerprint,
            "input_spec": asdict(self.input_spec) if self.input_spec else None,
            "strategies": {n: sorted(s.layers) for n, s in self.strategies.items()},
        }

    # --- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str) -> None:
        """Write config JSON + safetensors + a README card (see ``nnobfuscator.serialization``)."""
        from nnobfuscator.serialization import save_tiered

        save_tiered(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str, base_model: nn.Module, *, check_base: bool = True
    ) -> TieredModel:
        """Load an artifact onto ``base_model`` (the same trained weights it was calibrated on)."""
        from nnobfuscator.serialization import load_tiered

        return load_tiered(directory, base_model, check_base=check_base)


def _scatter(parts: list[tuple[torch.Tensor, Any]], batch: int) -> Any:
    """Reassemble per-group outputs (tensors, dicts, tuples of them) into batch order."""
    first = parts[0][1]
    if isinstance(first, torch.Tensor):
        out = first.new_empty((batch, *first.shape[1:]))
        for index, part in parts:
            out.index_copy_(0, index, part)
        return out
    if isinstance(first, Mapping):
        return type(first)((k, _scatter([(i, p[k]) for i, p in parts], batch)) for k in first)
    if isinstance(first, tuple | list):
        items = [_scatter([(i, p[j]) for i, p in parts], batch) for j in range(len(first))]
        return type(first)(items)
    raise TypeError(f"cannot split a mixed batch over model outputs of type {type(first).__name__}")


def obfuscate(
    model: nn.Module, config: ObfuscationConfig | None = None, **overrides: Any
) -> TieredModel:
    """Wrap a trained model as a :class:`TieredModel` (tiers still to be calibrated).

    Example:
        >>> tiered = obfuscate(model, ObfuscationConfig(tiers="free=60%,premium=full"))
        >>> calibrate(tiered, calibration_data, test_data)
        >>> logits = tiered(x, tier="free")
    """
    config = config or ObfuscationConfig()
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise TypeError(f"unknown obfuscation option {name!r}")
        setattr(config, name, value)
    strategies = []
    for name in config.strategy.split("+"):
        if get_strategy(name.strip()).role == "compute":
            raise ValueError(
                f"{name.strip()!r} is a compute strategy: pass it as compute=, not strategy="
            )
        strategies.append({"name": name.strip(), "targets": config.targets})
    for name in resolve_compute(model, config.compute):
        strategies.append({"name": name, "targets": None})
    return TieredModel(
        model,
        parse_tiers(config.tiers),
        strategies,
        coerce_key(config.key),
        task=config.task,
        model_name=config.model_name,
        input_spec=config.input_spec,
        meta=config.meta,
    )


def resolve_compute(model: nn.Module, compute: str | None) -> list[str]:
    """The compute strategy names for ``compute`` (``"auto"``: those the architecture allows)."""
    if not compute or compute == "none":
        return []
    if compute == "auto":
        if residual_blocks(model):
            return ["block-skip", "channel-slim", "input-resolution"]
        return ["input-resolution"]
    names = [name.strip() for name in compute.split("+") if name.strip()]
    for name in names:
        if get_strategy(name).role != "compute":
            raise ValueError(
                f"{name!r} is not a compute strategy; compute strategies: "
                + ", ".join(list_compute_strategies())
            )
    return names


def list_compute_strategies() -> list[str]:
    """Registered compute strategy names."""
    return [n for n in list_strategies() if get_strategy(n).role == "compute"]
