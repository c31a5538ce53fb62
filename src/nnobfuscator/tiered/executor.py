"""The one per-tier run: activate the tier, transform the input and the call, run, transform the
output.

Every path that runs a tiered model goes through :class:`TierExecutor`: ``TieredModel.forward``,
mixed-tier batches (grouped once, here: tiers that share a pass key run in one pass, each sample
at its own strength, through its own blocks; the others one pass each, scattered back), the
calibration runner, cost accounting and serving.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from nnobfuscator.core.outputs import batch_size, main_input, scatter, select, select_call
from nnobfuscator.core.tier_pass import MixedPassUnsupported, TierContext, pass_of
from nnobfuscator.core.tiers import Tier
from nnobfuscator.strategies import Strategy

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


def group_by_tier(tiers: Sequence[Any], known: Mapping[Any, Any]) -> dict[Any, torch.Tensor]:
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
        #: whether tiers that share a pass key may run in one pass (``None``: not checked yet)
        self.one_pass: bool | None = None
        #: sets of tiers whose shared passes were checked (their subsets need no check)
        self._checked: list[frozenset[str]] = []

    def active(self, tier: str | None) -> str | None:
        """The tier the wrapped layers see: ``None`` for the untouched model (or a ``full`` tier).

        Raises:
            RuntimeError: the tier is not calibrated yet.
        """
        if tier is None or self.tiers[tier].is_full:
            return None
        info = self.tiers[tier]
        if not all(name in info.params for name in self.strategies):
            raise RuntimeError(
                f"tier {tier!r} is not calibrated yet: run nnobfuscator.calibration.calibrator()"
            )
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
        return self._pass(self.active(tier), None, args, kwargs, body)

    def pass_key(self, tier: str) -> tuple:
        """What a forward pass must share to serve ``tier``: tiers with equal keys (the same
        compute setting, the same folded weights) run in one pass, each sample at its own tier."""
        active = self.active(tier)
        return tuple(
            None if active is None else s.pass_key(active) for s in self.strategies.values()
        )

    def run_mixed(self, tiers: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        """Run a batch with a tier per sample.

        Tiers that share a pass key run in one forward pass (each sample at its own strength,
        through its own blocks, with its own BatchNorm statistics); the rest run one pass per key,
        back to back, scattered back in order. Whether the model can serve a set of tiers in one
        pass is checked on the first mixed batch holding them (against one pass per tier) and
        remembered; a failed check, or a pass that meets :class:`MixedPassUnsupported`, makes
        every later batch run one pass per tier.

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
        by_tier = {name: [name] for name in groups}
        shared: dict[tuple, list[str]] = {}
        if self.one_pass is not False:
            for name in groups:
                shared.setdefault(self.pass_key(name), []).append(name)
        if self.one_pass is False or len(shared) == len(groups):
            return self._run_passes(by_tier, groups, tiers, args, kwargs, count)
        names = frozenset(groups)
        if any(names <= checked for checked in self._checked):
            try:
                return self._run_passes(shared, groups, tiers, args, kwargs, count)
            except MixedPassUnsupported:
                self.one_pass = False
                return self._run_passes(by_tier, groups, tiers, args, kwargs, count)
        separate = self._run_passes(by_tier, groups, tiers, args, kwargs, count)
        try:
            merged = self._run_passes(shared, groups, tiers, args, kwargs, count)
            self.one_pass = outputs_close(merged, separate)
        except MixedPassUnsupported:
            self.one_pass = False
        if self.one_pass:
            self._checked.append(names)
        return separate

    def generate(self, tiers: Sequence[str | None], body: Body, *args: Any, **kwargs: Any) -> Any:
        """Generate with a tier per row (``None``: the untouched model) in as few calls of
        ``body`` (the model's ``generate``) as there are pass keys among the tiers: the rows of
        tiers that share one decode together, every step of every row at its own tier (a layer
        runs on the rows whose tier keeps it, and keeps their key-value cache only).

        Rows of tiers that cannot share a pass come back padded on the right with
        ``pad_token_id`` (the call's, else the model's generation config's).

        Raises:
            ValueError: ``tiers`` does not name one known tier per row, or a strategy changes
                the model's output (generation reads logits at every step).
        """
        args, kwargs = as_call(args, kwargs)
        count = batch_size(main_input(args, kwargs))
        if len(tiers) != count:
            raise ValueError(f"tiers= needs one tier per row: got {len(tiers)} for {count} rows")
        changing = [name for name, s in self.strategies.items() if changes_output(s)]
        if changing:
            raise ValueError(
                f"{changing} change the model's output, which generate() does not read (it reads "
                "the logits of every step): use layer or compute strategies for generation"
            )
        groups = group_by_tier(tiers, {**self.tiers, None: None})
        shared: dict[tuple, list[Any]] = {}
        for name in groups:
            key = () if name is None else self.pass_key(name)
            shared.setdefault(key, []).append(name)
        parts = []
        for names in shared.values():
            rows = torch.cat([groups[name] for name in names]).sort().values
            part_args, part_kwargs = (
                (args, kwargs) if len(shared) == 1 else select_call(args, kwargs, rows, count)
            )
            lead, active = pass_of(tuple(self.active(tiers[i]) for i in rows.tolist()))
            with self.context.activate(lead, active):
                parts.append((rows, body(*part_args, **part_kwargs)))
        if len(parts) == 1:
            return parts[0][1]
        return _pad_scatter(parts, count, kwargs.get("pad_token_id", _pad_id(self.model)))

    def _run_passes(
        self,
        passes: Mapping[Any, list[str]],
        groups: Mapping[str, torch.Tensor],
        tiers: Sequence[str],
        args: tuple,
        kwargs: dict[str, Any],
        count: int,
    ) -> Any:
        """One forward pass per entry of ``passes`` (tier names sharing it), scattered back."""
        if len(passes) == 1:
            return self._run_rows(tuple(tiers), args, kwargs)
        parts = []
        for names in passes.values():
            rows = torch.cat([groups[name] for name in names])
            part_args, part_kwargs = select_call(args, kwargs, rows, count)
            row_tiers = tuple(name for name in names for _ in range(len(groups[name])))
            parts.append((rows, self._run_rows(row_tiers, part_args, part_kwargs)))
        return scatter(parts, count)

    def _run_rows(self, tiers: tuple[str, ...], args: tuple, kwargs: dict[str, Any]) -> Any:
        """One pass serving each sample at its own tier (all sharing one pass key)."""
        lead, rows = pass_of(tuple(self.active(name) for name in tiers))
        return self._pass(lead, rows, args, kwargs)

    def _pass(
        self,
        lead: str | None,
        rows: tuple[str | None, ...] | None,
        args: tuple,
        kwargs: dict[str, Any],
        body: Body | None = None,
    ) -> Any:
        """The one forward pass: transform the input and the call (``lead``'s setting, shared by
        every sample), run with the samples' tiers active, transform each tier's outputs."""
        args, kwargs = as_call(args, kwargs)
        inputs = main_input(args, kwargs)
        transformed = self.transform_input(inputs, lead)
        if args:
            args = (transformed, *args[1:])
        else:  # keyword-only call: the first keyword carries the batch
            kwargs = {**kwargs, next(iter(kwargs)): transformed}
        if lead is not None:
            for strategy in self.strategies.values():
                args, kwargs = strategy.transform_call(args, kwargs, lead)
        with self.context.activate(lead, rows):
            output = (body or partial(invoke, self.model))(*args, **kwargs)
        changing = [s for s in self.strategies.values() if changes_output(s)]
        if lead is None or not changing:
            return output
        if rows is None:
            for strategy in changing:
                output = strategy.transform_output(output, inputs, lead)
            return output
        parts = []
        count = len(rows)
        for tier, index in group_by_tier(rows, {**self.tiers, None: None}).items():  # type: ignore[dict-item]
            part = select(output, index)
            if tier is not None:
                part_inputs = select(inputs, index)
                for strategy in changing:
                    part = strategy.transform_output(part, part_inputs, tier)
            parts.append((index, part))
        return scatter(parts, count)


def _pad_id(model: nn.Module) -> int:
    config = getattr(model, "generation_config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        value = value[0] if isinstance(value, list | tuple) and value else value
        if isinstance(value, int):
            return value
    return 0


def _pad_scatter(parts: list[tuple[torch.Tensor, Any]], count: int, pad_id: int) -> torch.Tensor:
    """Token sequences of row groups, padded on the right to one length, back in row order.

    Raises:
        ValueError: a group's output is not a tensor of token ids.
    """
    if not all(isinstance(out, torch.Tensor) and out.dim() == 2 for _, out in parts):
        raise ValueError(
            "tiers that decode in separate calls need generate() to return token ids "
            "(return_dict_in_generate=False)"
        )
    length = max(out.shape[1] for _, out in parts)
    first = parts[0][1]
    result = first.new_full((count, length), pad_id)
    for rows, out in parts:
        result[rows.to(out.device), : out.shape[1]] = out
    return result


def changes_output(strategy: Strategy) -> bool:
    """Whether ``strategy`` transforms the model's output (its class overrides the hook)."""
    return type(strategy).transform_output is not Strategy.transform_output


def outputs_close(first: Any, second: Any) -> bool:
    """Whether two model outputs hold the same tensors up to float rounding (``False`` when they
    hold none to compare)."""
    left, right = _tensors(first), _tensors(second)
    if not left or len(left) != len(right):
        return False
    for a, b in zip(left, right, strict=True):
        if a.shape != b.shape:
            return False
        a, b = a.detach().float(), b.detach().float()
        scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale):
            return False
    return True


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, tuple | list):
        return [t for value in output for t in _tensors(value)]
    return []
