"""What strategies share: the base class, the registry and the generic choice of target layers.

Strategies come in two roles. *Degrading* strategies lower utility by a continuous strength per
tier: a *layer* strategy transforms the weights of chosen layers (cached per tier, so a tier costs
what the plain layer costs), an *output* strategy transforms the model's output. *Compute*
strategies (``nnobfuscator.strategies.compute``) make a tier cheaper with a discrete setting.

A strategy keeps no calibrated state of its own: a tier's parameters live in
``Tier.params[strategy.name]`` (the tiers are the one owner) and the strategy reads them there.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from nnobfuscator.core.layer_adapters import layer_adapter
from nnobfuscator.core.registry import Registry, TypeRegistry
from nnobfuscator.core.wrapping import Host, TieredLayer, acts_on_activations, unwrapped_name
from nnobfuscator.strategies.options import StrategyConfig


class Strategy:
    """Base of all obfuscation strategies: one scalar strength per tier, 0 meaning untouched.

    Subclasses set ``name`` and ``kind`` and override :meth:`prepare_layer` and
    :meth:`transform_weight` (layer strategies) or :meth:`transform_output` (output strategies).

    Args:
        key: the tiered model's secret key; every random choice derives from it.
        options: the strategy's typed options (``config_class``; ``None``: the defaults, acting
            on the default targets, :func:`resolve_targets`).
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "layer"
    role: ClassVar[str] = "degrade"
    max_strength: ClassVar[float] = 1.0
    description: ClassVar[str] = ""
    #: known to fall to an attack on served tiers (``nnobf attack``); ``nnobf serve`` refuses it
    #: unless told ``--allow-weak``
    weak: ClassVar[bool] = False
    #: where the default targets start, as a share of the model's candidate layers in order
    default_start: ClassVar[float] = 1 / 3
    #: the dataclass of this strategy's options
    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig

    def __init__(self, key: bytes, options: StrategyConfig | None = None) -> None:
        if options is None:
            options = self.config_class(name=self.name)
        elif options.name != self.name:
            raise ValueError(f"{self.name} got the options of {options.name!r}")
        elif type(options) is not self.config_class:
            options = self.config_class.from_dict(options.to_dict())
        self.key = key
        self.options = options
        self.target_patterns = options.targets or None
        self.layers: dict[str, nn.Module] = {}
        self.host: Host | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def attach(self, host: Host) -> None:
        """Wrap the target layers of ``host.root`` (layer strategies)."""
        self.host = host
        if self.kind != "layer":
            return
        for name in resolve_targets(host.root, self.target_patterns, self.default_start):
            layer = host.wrap_layer(name)
            self.layers[name] = layer
            self.prepare_layer(name, layer)
            layer.transforms[self.name] = self

    def detach(self) -> None:
        for layer in self.layers.values():
            if isinstance(layer, TieredLayer):
                layer.transforms.pop(self.name, None)
        self.layers.clear()

    def prepare_layer(self, name: str, layer: TieredLayer) -> None:
        """Prepare keyed state for one target layer."""

    # --- per-tier parameters (read from the tiers, never stored here) -----------------------
    def params(self, tier: str) -> dict[str, Any]:
        """This strategy's calibrated parameters at ``tier`` (empty when it has none)."""
        info = self.host.tiers.get(tier) if self.host is not None else None
        return info.params.get(self.name, {}) if info is not None else {}

    def strength(self, tier: str) -> float:
        return float(self.params(tier).get("strength", 0.0))

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Validate a tier's parameters for this strategy; returns them normalised.

        Raises:
            ValueError: a strength outside ``[0, max_strength]``.
        """
        strength = params.get("strength")
        if not isinstance(strength, int | float) or not 0.0 <= strength <= self.max_strength:
            raise ValueError(
                f"{self.name} strength must lie in [0, {self.max_strength}], got {strength!r}"
            )
        return {"strength": float(strength)}

    def is_active(self, tier: str) -> bool:
        """Whether this strategy changes anything at ``tier``."""
        return self.strength(tier) > 0.0

    def signature(self, tier: str) -> Any:
        """What this strategy's weights depend on at ``tier`` (``None``: unchanged)."""
        strength = self.strength(tier)
        return strength if strength > 0.0 else None

    def pass_key(self, tier: str) -> Any:
        """What a forward pass must share to serve ``tier`` together with other tiers.

        ``None`` when this strategy can serve each sample of a pass at its own tier: output
        strategies (applied per tier after the pass), strategies that act on activations with a
        strength per sample, or a tier it leaves unchanged. Otherwise the tier's parameters (a
        folded weight, a compute setting), so only tiers with equal ones share a pass.
        """
        if self.kind == "output" or acts_on_activations(self) or not self.is_active(tier):
            return None
        return json.dumps(self.params(tier), sort_keys=True, default=str)

    # --- transforms ------------------------------------------------------------------------
    def transform_weight(self, layer: str, weight: torch.Tensor, tier: str) -> torch.Tensor:
        raise NotImplementedError

    def transform_input(self, inputs: Any, tier: str) -> Any:
        """Transform the model's main input at ``tier`` (identity unless a strategy changes it)."""
        return inputs

    def transform_call(
        self, args: tuple, kwargs: dict[str, Any], tier: str
    ) -> tuple[tuple, dict[str, Any]]:
        """Change the call's options at ``tier`` (a pipeline's denoising steps); identity here."""
        return args, kwargs

    def input_signature(self, tier: str) -> Any:
        """What :meth:`transform_input` depends on at ``tier`` (``None``: inputs unchanged)."""
        return None

    def transform_output(self, output: Any, inputs: Any, tier: str) -> Any:
        """Transform the model output at ``tier`` (output strategies)."""
        return output

    # --- sealed weights --------------------------------------------------------------------
    def sealed_state(self, tier: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Write what ``tier`` changes into ``state`` (a plain state dict of the model, plain
        module names), so that the plain model runs the tier; returns facts for the bundle's
        manifest.

        Layer strategies fold their change into the weights of their layers.

        Raises:
            NotImplementedError: the strategy acts at run time in a way weights cannot carry.
        """
        if not self.is_active(tier):
            return {}
        if self.kind != "layer":
            raise NotImplementedError(
                f"{self.name!r} acts at run time and cannot be written into plain weights"
            )
        for name, layer in self.layers.items():
            if isinstance(layer, TieredLayer):
                weight = layer.tier_weight(tier, fold_all=True)
                if weight is not None:
                    state[f"{name}.{layer.adapter.weight}"] = weight.detach().cpu().contiguous()
        return {}

    # --- persistence -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """What rebuilds this strategy: its options, with the target layers resolved."""
        return {**self.options.to_dict(), "targets": self.resolved_targets()}

    def resolved_targets(self) -> list[str] | None:
        """The layers this strategy acts on, as saved (its patterns before it is attached)."""
        return sorted(self.layers) or self.target_patterns

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Keyed tensors worth saving (small ones); large ones are re-derived from the key."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` saved."""

    def fingerprint(self) -> str:
        """A digest of all keyed state, to check that a loaded strategy derives the same."""
        digest = hashlib.sha256(self.name.encode())
        for name, tensor in sorted(self.derived_tensors().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def derived_tensors(self) -> dict[str, torch.Tensor]:
        return self.state_tensors()


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def strategy_config(spec: str | StrategyConfig | Mapping[str, Any]) -> StrategyConfig:
    """The typed options of one strategy, from its name, its options or a saved mapping.

    Raises:
        ValueError: no strategy of that name is registered, an option it does not take, or an
            invalid value.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    elif isinstance(spec, StrategyConfig):
        spec = spec.to_dict()
    return get_strategy(spec.get("name", "")).config_class.from_dict(spec)


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the registry under ``cls.name`` (refuses duplicates)."""
    STRATEGIES.register(cls.name, cls)
    return cls


def list_strategies() -> list[str]:
    return STRATEGIES.names()


def get_strategy(name: str) -> type[Strategy]:
    return STRATEGIES.get(name)


# --- target layers -----------------------------------------------------------------------------
def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers a strategy can act on, by name, in the model's definition order.

    Every module with a layer adapter (``Conv`` but not depthwise, ``Linear``,
    ``MultiheadAttention``), except modules inside another candidate (an attention's
    ``out_proj`` is read by the attention, not called).
    """
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        plain = unwrapped_name(name)
        parts = plain.split(".")
        if not name or any(".".join(parts[:i]) in found for i in range(1, len(parts) + 1)):
            continue
        if isinstance(module, TieredLayer) or layer_adapter(module) is not None:
            found[plain] = module
    return found


MAX_DEFAULT_WEIGHTS = 16_000_000

DEFAULT_TARGETS: TypeRegistry[Callable[[nn.Module], list[str]]] = TypeRegistry("default targets")


def register_default_targets(
    model_type: type[nn.Module], rule: Callable[[nn.Module], list[str]]
) -> None:
    """Give models of ``model_type`` their own default target layers (``rule(model)`` returns
    plain module names), in place of the generic middle-of-the-network rule."""
    DEFAULT_TARGETS.register(model_type, rule)


def resolve_targets(
    model: nn.Module, patterns: list[str] | None, default_start: float = 1 / 3
) -> list[str]:
    """Names of the layers matching ``patterns``, or the default: the middle of the network
    (or what :func:`register_default_targets` says for the model's type).

    The default rule is generic: of the candidate layers in order, skip the stem (the first
    ``default_start`` share, at least one layer) and the head (the last layer), and keep the rest,
    except layers of over ``MAX_DEFAULT_WEIGHTS`` weights (VGG's 25088x4096 classifier layer):
    each tier would hold a copy of them.

    Raises:
        ValueError: nothing matches, or the model has too few layers for a default.
    """
    candidates = candidate_layers(model)
    names = list(candidates)
    rule = DEFAULT_TARGETS.lookup(model) if patterns is None else None
    if rule is not None and (chosen := rule(model)):
        return chosen
    if patterns is None:
        if len(names) < 2:
            raise ValueError(
                f"no default target layers for {type(model).__name__}: it has {len(names)} "
                "layers that can be tiered (Conv, Linear, MultiheadAttention); pass "
                "targets=['module.name.pattern', ...]"
            )
        if len(names) == 2:  # a stem and one more layer
            return names[1:]
        start = max(1, int(len(names) * default_start))
        chosen = [n for n in names[start:-1] if _weight_size(candidates[n]) <= MAX_DEFAULT_WEIGHTS]
        return chosen or names[start:-1]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ValueError(
            f"target patterns {patterns} match no layer that can be tiered in "
            f"{type(model).__name__}; some layer names: {names[:8]}"
        )
    return chosen


def _weight_size(module: nn.Module) -> int:
    inner = module.base_layer if isinstance(module, TieredLayer) else module
    adapter = layer_adapter(inner)
    return getattr(inner, adapter.weight).numel() if adapter is not None else 0
