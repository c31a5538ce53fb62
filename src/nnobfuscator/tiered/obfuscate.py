"""``obfuscate``: wrap a model in tiers, with the strategies its structure allows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nnobfuscator.core.diffusion import PIPELINE_COMPUTE, PipelineModule, as_module
from nnobfuscator.core.key_derivation import coerce_key
from nnobfuscator.core.tiers import parse_tiers
from nnobfuscator.strategies import get_strategy, list_strategies
from nnobfuscator.strategies.base import strategy_config
from nnobfuscator.strategies.blocks import skippable_blocks, slimmable_blocks
from nnobfuscator.strategies.options import StrategyConfig
from nnobfuscator.tiered.model import InputSpec, TieredModel


@dataclass
class ObfuscationConfig:
    """How to turn a model into a tiered model.

    Args:
        tiers: ``"free=60%,pro=85%,premium=full"``, a list or a mapping (see ``parse_tiers``).
        strategy: a registered degrading strategy, or several joined with ``+``; ``"auto"``
            (the default): ``class-merge`` for a classifier with an ``nn.Linear`` head (its
            tiers withhold what they do not show), ``feature-mix`` otherwise. A strategy with
            options: its typed config (``FeatureMixConfig(block=64)``), or a list of configs
            and names. ``"none"``: tiers differ by their compute setting alone.
        compute: compute strategies that make lower tiers cheaper, joined with ``+``
            (``"block-skip+channel-slim+input-resolution"``), ``"auto"`` (those that apply to the
            architecture) or ``None`` (every tier costs what the full model costs).
        targets: module-name patterns of the layers to act on; ``None`` uses the default.
        key: the secret key (bytes or hex); ``None`` draws a new random one.
        task: ``"classification"``, ``"segmentation"``, ``"text-to-image"`` (tasks register
            themselves in ``nnobfuscator.tasks``); ``None``: text-to-image for a diffusion
            pipeline, classification otherwise.
        input_spec: the expected image input; checked on every call.
        model_name: a label for reports, e.g. ``"resnet18"``.
        call_options: for a diffusion pipeline, the options of every call unless it passes its
            own (the full tier's ``num_inference_steps``, ``guidance_scale``, ...); saved with it.
    """

    tiers: str | list[Any] | dict[str, Any] = "free=60%,pro=85%,premium=full"
    strategy: str | StrategyConfig | list[str | StrategyConfig] = "auto"
    compute: str | None = None
    targets: list[str] | None = None
    key: bytes | str | None = None
    task: str | None = None
    input_spec: InputSpec | None = None
    model_name: str = "model"
    meta: dict[str, Any] = field(default_factory=dict)
    call_options: dict[str, Any] | None = None


def obfuscate(model: Any, config: ObfuscationConfig | None = None, **overrides: Any) -> TieredModel:
    """Wrap a trained model, or a diffusers pipeline, as a :class:`TieredModel` (tiers still to
    be calibrated). The model is wrapped in place, never copied.

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
    model = as_module(model, config.call_options)
    meta = dict(config.meta)
    if isinstance(model, PipelineModule):
        meta["call_options"] = model.call_options
    task = config.task or (
        "text-to-image" if isinstance(model, PipelineModule) else "classification"
    )
    strategies = degrading_strategies(model, config.strategy, config.targets, task)
    strategies += [strategy_config(name) for name in resolve_compute(model, config.compute, task)]
    return TieredModel(
        model,
        parse_tiers(config.tiers),
        strategies,
        coerce_key(config.key),
        task=task,
        model_name=config.model_name,
        input_spec=config.input_spec,
        meta=meta,
    )


def degrading_strategies(
    model: nn.Module,
    strategy: str | StrategyConfig | Sequence[str | StrategyConfig],
    targets: list[str] | None,
    task: str,
) -> list[StrategyConfig]:
    """The typed options of each degrading strategy ``strategy`` names (see
    :class:`ObfuscationConfig`); ``targets`` go to those named without options of their own.

    Raises:
        ValueError: an unknown strategy or option, or a compute strategy given as ``strategy``.
    """
    if isinstance(strategy, str):
        strategy = resolve_strategy(model, strategy, task)
        if strategy.strip() == "none":
            return []
        items: list[str | StrategyConfig] = strategy.split("+")
    elif isinstance(strategy, StrategyConfig):
        items = [strategy]
    else:
        items = list(strategy)
    configs = []
    for item in items:
        if isinstance(item, str):
            config = strategy_config({"name": item.strip(), "targets": targets})
        elif isinstance(item, StrategyConfig):
            config = strategy_config(item)
        else:
            raise ValueError(
                f"strategy must be a name, a strategy config (e.g. FeatureMixConfig(block=64)) or "
                f"a list of them, got {item!r}"
            )
        if get_strategy(config.name).role == "compute":
            raise ValueError(
                f"{config.name!r} is a compute strategy: pass it as compute=, not strategy="
            )
        configs.append(config)
    return configs


def resolve_strategy(model: nn.Module, strategy: str, task: str) -> str:
    """The degrading strategy names for ``strategy`` (``"auto"``: ``class-merge`` for a
    classifier whose last ``nn.Linear`` can be its head, ``"none"`` for a language model (its
    compute tiers do the lowering), ``feature-mix`` otherwise)."""
    if strategy.strip() != "auto":
        return strategy
    if task == "classification" and any(isinstance(m, nn.Linear) for m in model.modules()):
        return "class-merge"
    if task == "text-generation":
        return "none"
    return "feature-mix"


def resolve_compute(
    model: nn.Module, compute: str | None, task: str = "classification"
) -> list[str]:
    """The compute strategy names for ``compute`` (``"auto"``: those the architecture allows).

    ``auto`` takes block skip where the model has skippable residual blocks, channel slim where
    it has slimmable blocks but none to skip (channel slimming cuts weight slices, which a model
    cannot keep for every tier within about one model's memory, so it pays at large batches
    only), and input resolution for image models (first layer a ``Conv2d``); fewer steps and
    guidance cut-off for a diffusion pipeline. A language model (``task="text-generation"``)
    takes both block skip and channel slim: its decoder layers are few and costly to skip, its
    MLPs hold most of its weights.
    """
    if not compute or compute == "none":
        return []
    if compute == "auto":
        if isinstance(model, PipelineModule):
            return list(PIPELINE_COMPUTE)
        names = []
        if skippable_blocks(model):
            names.append("block-skip")
        if slimmable_blocks(model) and (task == "text-generation" or not names):
            names.append("channel-slim")
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)), None)
        if isinstance(first, nn.Conv2d):
            names.append("input-resolution")
        return names
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
