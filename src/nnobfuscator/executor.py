"""The one per-tier run: activate the tier, transform the input and the call, run, transform the
output.

Every path that runs a tiered model goes through :class:`TierExecutor`: ``TieredModel.forward``,
mixed-tier batches (grouped by tier once, here, and scattered back), the calibration runner, cost
accounting and serving.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from nnobfuscator.outputs import batch_size, main_input, scatter, select_call
from nnobfuscator.strategies import Strategy
from nnobfuscator.tiers import Tier
from nnobfuscator.wrapping import TierContext

Body = Callable[..., Any]


def invoke(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Call ``model`` with what it takes: a dict alone is passed as keyword inputs (token ids)."""
    args, kwargs = as_call(args, kwargs)
    return model(*args, **kwargs)


def as_call(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of a call; a dict given alone stands for keyword inputs (before the
    call's own keywords: its first entry carries the batch)."""
    if len(args) == 1 and isinstance(args[0], Mapping):
        return (), {**args[0], **kwargs}
    return args, kwargs


def group_by_tier(tiers: Sequence[str], known: Mapping[str, Tier]) -> dict[str, torch.Tensor]:
    """Row indices per tier, in order of first appearance.

    Raises:
        ValueError: an unknown tier name.
    """
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(tiers):
        if name not in known:
            raise ValueError(f"unknown tier {name!r}; this model has {list(known)}")
        groups.setdefault(name, []).append(row)
    return {name: torch.tensor(rows) for name, rows in groups.items()}


class TierExecutor:
    """Runs a wrapped model at a tier, or at a tier per sample.

    Args:
        model: the user's model (its layers wrapped in place).
        context: the tier context the wrapped layers read.
        tiers: the tiers by name (their calibrated parameters).
        strategies: the attached strategies by name.
    """

    def __init__(
        self,
        model: nn.Module,
        context: TierContext,
        tiers: Mapping[str, Tier],
        strategies: Mapping[str, Strategy],
    ) -> None:
        self.model, self.context, self.tiers, self.strategies = model, context, tiers, strategies

    def active(self, tier: str | None) -> str | None:
        """The tier the wrapped layers see: ``None`` for the untouched model (or a ``full`` tier).

        Raises:
            RuntimeError: the tier is not calibrated yet.
        """
        if tier is None or self.tiers[tier].is_full:
            return None
        info = self.tiers[tier]
        if not all(name in info.params for name in self.strategies):
            raise RuntimeError(f"tier {tier!r} is not calibrated yet: run nnobfuscator.calibrate()")
        return tier

    def transform_input(self, inputs: Any, tier: str | None) -> Any:
        if tier is not None:
            for strategy in self.strategies.values():
                inputs = strategy.transform_input(inputs, tier)
        return inputs

    def run(self, tier: str | None, *args: Any, body: Body | None = None, **kwargs: Any) -> Any:
        """Run the call ``(args, kwargs)`` at ``tier`` (``None``: the untouched model).

        Args:
            body: what runs the (transformed) inputs; the model itself by default. The calibration
                runner passes one that continues from cached activations.
        """
        active = self.active(tier)
        args, kwargs = as_call(args, kwargs)
        inputs = main_input(args, kwargs)
        transformed = self.transform_input(inputs, active)
        if args:
            args = (transformed, *args[1:])
        else:  # keyword-only call: the first keyword carries the batch
            kwargs = {**kwargs, next(iter(kwargs)): transformed}
        if active is not None:
            for strategy in self.strategies.values():
                args, kwargs = strategy.transform_call(args, kwargs, active)
        with self.context.activate(active):
            output = (body or partial(invoke, self.model))(*args, **kwargs)
        if active is not None:
            for strategy in self.strategies.values():
                output = strategy.transform_output(output, inputs, active)
        return output

    def run_mixed(self, tiers: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        """Run a batch with a tier per sample: one run per tier present, scattered back in order.

        Raises:
            ValueError: ``tiers`` does not name one known tier per sample.
        """
        args, kwargs = as_call(args, kwargs)
        count = batch_size(main_input(args, kwargs))
        if isinstance(tiers, str) or len(tiers) != count:
            raise ValueError(
                f"tiers= needs one tier name per sample: got {len(tiers)} for a batch of {count}"
            )
        groups = group_by_tier(tiers, self.tiers)
        if len(groups) == 1:
            return self.run(next(iter(groups)), *args, **kwargs)
        parts = []
        for name, rows in groups.items():
            part_args, part_kwargs = select_call(args, kwargs, rows, count)
            parts.append((rows, self.run(name, *part_args, **part_kwargs)))
        return scatter(parts, count)
