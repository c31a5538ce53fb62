"""What strategies share: the tier context, the wrapped layer, the base class and the registry.

Strategies come in two roles. *Degrading* strategies lower utility by a continuous strength per
tier: a *layer* strategy transforms the weights of chosen ``Conv2d``/``Linear`` layers (cached per
tier, so a tier costs what the plain layer costs), an *output* strategy transforms the model's
output. *Compute* strategies (``nnobfuscator.strategies.compute``) make a tier cheaper with a
discrete setting per tier (skipped blocks, kept channels, input resolution).
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from nnobfuscator.model import TieredModel

WeightTransform = Callable[[torch.Tensor, str], torch.Tensor | None]
_context_counter = 0


class TierContext:
    """Carries the tier of the forward pass in flight down to the wrapped layers.

    Backed by a ``ContextVar``: concurrent forwards in other threads or asyncio tasks each see
    their own tier, so no request ever sees another's.
    """

    def __init__(self) -> None:
        global _context_counter
        _context_counter += 1
        self._var: ContextVar[str | None] = ContextVar(
            f"nnobf_tier_{_context_counter}", default=None
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


class TieredLayer(nn.Module):
    """A ``Conv2d`` or ``Linear`` whose weight depends on the active tier.

    The original module is kept as ``base_layer`` and runs untouched (bit-exact) when no tier, or a
    tier no strategy changes, is active. Per-tier weights are computed once and cached.
    """

    def __init__(self, base_layer: nn.Conv2d | nn.Linear, context: TierContext) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Conv2d) and base_layer.groups != 1:
            raise ValueError("grouped convolutions cannot be tiered yet; pick other target layers")
        self.base_layer = base_layer
        self._context = context
        self.weight_transforms: dict[str, WeightTransform] = {}
        self._weights: dict[str, torch.Tensor | None] = {}

    def invalidate(self, tier: str | None = None) -> None:
        """Forget cached weights of ``tier`` (all tiers when ``None``) after a strength changed."""
        if tier is None:
            self._weights.clear()
        else:
            self._weights.pop(tier, None)

    def tier_weight(self, tier: str) -> torch.Tensor | None:
        """The weight this layer uses at ``tier``, or ``None`` when it is the original one."""
        base = self.base_layer.weight
        cached = self._weights.get(tier, base)
        if cached is not base and (cached is None or cached.device == base.device):
            return cached
        # Cached weights must be ordinary tensors even when first built under inference_mode
        # (calibration), or later forwards with autograd enabled would refuse them.
        with torch.inference_mode(False), torch.no_grad():
            weight, changed = base.detach().float(), False
            for transform in self.weight_transforms.values():
                new = transform(weight, tier)
                if new is not None:
                    weight, changed = new, True
            result = weight.to(base.dtype).contiguous() if changed else None
        self._weights[tier] = result
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tier = self._context.current
        weight = None if tier is None else self.tier_weight(tier)
        if weight is None:
            return self.base_layer(x)
        if isinstance(self.base_layer, nn.Conv2d):
            return self.base_layer._conv_forward(x, weight, self.base_layer.bias)
        return F.linear(x, weight, self.base_layer.bias)


class Strategy:
    """Base of all obfuscation strategies: one scalar strength per tier, 0 meaning untouched.

    Subclasses set ``name`` and ``kind`` and override :meth:`attach_layer` (layer strategies) or
    :meth:`transform_output` (output strategies).

    Args:
        key: the tiered model's secret key; every random choice derives from it.
        targets: module-name patterns (``fnmatch``) of the layers to act on; ``None`` picks the
            architecture's default.
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "layer"
    role: ClassVar[str] = "degrade"
    max_strength: ClassVar[float] = 1.0
    description: ClassVar[str] = ""

    def __init__(self, key: bytes, targets: list[str] | None = None, **options: Any) -> None:
        if options:
            raise ValueError(f"strategy {self.name!r} got unknown options {sorted(options)}")
        self.key = key
        self.target_patterns = list(targets) if targets else None
        self.strengths: dict[str, float] = {}
        self.layers: dict[str, TieredLayer] = {}

    # --- lifecycle -------------------------------------------------------------------------
    def attach(self, tiered: TieredModel) -> None:
        """Wrap the target layers of ``tiered.base_model`` (layer strategies)."""
        if self.kind != "layer":
            return
        names = resolve_targets(tiered.base_model, self.target_patterns, self.name)
        for name in names:
            layer = tiered.wrap_layer(name)
            self.layers[name] = layer
            self.attach_layer(name, layer)
            layer.weight_transforms[self.name] = self._make_transform(name)

    def detach(self) -> None:
        for layer in self.layers.values():
            layer.weight_transforms.pop(self.name, None)
            layer.invalidate()
        self.layers.clear()

    def attach_layer(self, name: str, layer: TieredLayer) -> None:
        """Prepare keyed state for one target layer."""

    def _make_transform(self, name: str) -> WeightTransform:
        def transform(weight: torch.Tensor, tier: str) -> torch.Tensor | None:
            strength = self.strengths.get(tier, 0.0)
            return None if strength == 0.0 else self.transform_weight(name, weight, strength)

        return transform

    def transform_weight(self, name: str, weight: torch.Tensor, strength: float) -> torch.Tensor:
        raise NotImplementedError

    def transform_input(self, inputs: torch.Tensor, tier: str) -> torch.Tensor:
        """Transform the model input at ``tier`` (identity unless a strategy changes inputs)."""
        return inputs

    def input_signature(self, tier: str) -> Any:
        """What :meth:`transform_input` depends on at ``tier`` (``None``: inputs unchanged)."""
        return None

    def transform_output(self, output: Any, inputs: torch.Tensor, tier: str) -> Any:
        """Transform the model output at ``tier`` (output strategies)."""
        return output

    # --- per-tier parameters ---------------------------------------------------------------
    def load_params(self, tier: str, params: dict[str, Any]) -> None:
        """Restore a tier's calibrated parameters (as stored in ``Tier.params[self.name]``)."""
        if "strength" in params:
            self.set_strength(tier, params["strength"])

    def is_active(self, tier: str) -> bool:
        """Whether this strategy changes anything at ``tier``."""
        return self.strengths.get(tier, 0.0) > 0.0

    def set_strength(self, tier: str, strength: float) -> None:
        if not 0.0 <= strength <= self.max_strength:
            raise ValueError(
                f"{self.name} strength must lie in [0, {self.max_strength}], got {strength}"
            )
        self.strengths[tier] = float(strength)
        for layer in self.layers.values():
            layer.invalidate(tier)

    # --- persistence -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """What rebuilds this strategy: its name and its resolved target layers."""
        return {"name": self.name, "targets": sorted(self.layers) or self.target_patterns}

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


_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def list_strategies() -> list[str]:
    return sorted(_REGISTRY)


def get_strategy(name: str) -> type[Strategy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of {', '.join(list_strategies())}"
        ) from None


# --- target layers -----------------------------------------------------------------------------
# ResNets: mixing the inputs of the residual branches of the last three stages spreads the damage
# over several layers (one layer bottoms out; the classifier input falls off a cliff).
_RESNET_PATTERNS: dict[str, list[str]] = {
    "feature-mix": ["*layer2.*.conv1", "*layer3.*.conv1", "*layer4.*.conv1"],
    "weight-noise": ["*layer3.*.conv*", "*layer4.*.conv*"],
}
# Other CNNs (VGG, plain stacks): a share of the convolutions, from the middle on.
_CONV_SHARE: dict[str, float] = {"feature-mix": 1 / 3, "weight-noise": 1 / 2}


def _is_resnet(model: nn.Module) -> bool:
    """A torchvision ResNet, or a model with a ResNet backbone (DeepLabV3, FCN)."""
    if any(cls.__name__ == "ResNet" for cls in type(model).__mro__):
        return True
    return hasattr(getattr(model, "backbone", None), "layer1")


def resolve_targets(model: nn.Module, patterns: list[str] | None, strategy: str) -> list[str]:
    """Names of the ``Conv2d``/``Linear`` layers matching ``patterns`` (or the default).

    Raises:
        ValueError: nothing matches, or the model has too few convolutions for a default.
    """
    candidates = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear | TieredLayer)
        and not name.endswith(".base_layer")
    }
    if patterns is None:
        if _is_resnet(model) and strategy in _RESNET_PATTERNS:
            patterns = _RESNET_PATTERNS[strategy]
        else:
            convs = [
                n
                for n, m in candidates.items()
                if isinstance(m, nn.Conv2d)
                or isinstance(m, TieredLayer)
                and isinstance(m.base_layer, nn.Conv2d)
            ]
            if len(convs) < 2:
                raise ValueError(
                    f"no default target layers for {type(model).__name__} ({len(convs)} "
                    "convolutions); pass targets=['module.name.pattern', ...]"
                )
            start = max(1, int(len(convs) * _CONV_SHARE.get(strategy, 1 / 3)))
            patterns = convs[start:]
    names = [n for n in candidates if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise ValueError(
            f"target patterns {patterns} match no Conv2d/Linear layer of {type(model).__name__}; "
            f"some layer names: {list(candidates)[:8]}"
        )
    return names
