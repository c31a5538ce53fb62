"""What the stages of a calibration share: the model, its task and splits, the options, and what
each stage has found so far (compute settings, knobs, extractable rows, the report)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from nnobfuscator.calibration.runner import SplitRunner
from nnobfuscator.calibration.strength import StrengthCurve
from nnobfuscator.core.data import DataLike, Split, as_split
from nnobfuscator.core.outputs import select
from nnobfuscator.core.tiers import Tier
from nnobfuscator.tasks import Task, get_task
from nnobfuscator.tiered.model import TieredModel


class CalibrationError(ValueError):
    """A tier target cannot be reached; the message names the reachable range."""


@dataclass(frozen=True)
class CalibrationOptions:
    """How :func:`~nnobfuscator.calibration.calibrator.calibrate` searches (its keyword
    arguments, documented there)."""

    dataset: str = "custom"
    batch_size: int = 256
    max_evals: int = 16
    headroom: float | None = None
    beam: int = 1
    progress: bool = True
    against: str = "face"
    queries: Sequence[int] = (300, 1000)
    pool: DataLike | None = None
    build_copy: Callable[[], nn.Module] | None = None
    recipe: Any = None
    margin: float = 0.03

    def __post_init__(self) -> None:
        if self.against not in ("face", "extractable"):
            raise ValueError(f"against must be 'face' or 'extractable', got {self.against!r}")


def halves(split: Split) -> tuple[Split, Split]:
    """Two disjoint halves of a split, each with the classes' shares of the whole when labels
    are classes (alternate samples of each class), else alternate samples."""
    labels = split.labels
    order = torch.argsort(labels, stable=True) if labels.dim() == 1 else torch.arange(len(split))
    first, second = order[0::2].sort().values, order[1::2].sort().values
    return (
        Split(f"{split.name}-search", select(split.inputs, first), labels[first]),
        Split(f"{split.name}-land", select(split.inputs, second), labels[second]),
    )


@dataclass
class CalibrationState:
    """One calibration in progress, handed from stage to stage.

    ``search`` is the half of the calibration split that compute settings and fitted readouts
    are chosen on, ``land`` the half the strengths land the targets on (both the whole split
    for a model with neither): the cheapest of many settings looks better on the data it was
    picked on than it is.
    """

    model: TieredModel
    task: Task
    calibration: Split
    test: Split | None
    options: CalibrationOptions
    search: Split
    land: Split
    tiers: list[Tier]
    fitted: list[Any]
    curve: StrengthCurve
    base: float
    tolerance: float
    progress: Any
    started: float = field(default_factory=time.perf_counter)
    compute_search: Any = None
    required: dict[str, float] = field(default_factory=dict)
    compute_utility: dict[str, float] = field(default_factory=dict)
    knobs: dict[str, float] = field(default_factory=dict)
    extractable: dict[str, Any] = field(default_factory=dict)
    calibration_s: float | None = None
    report: dict[str, Any] | None = None

    @classmethod
    def start(
        cls,
        model: TieredModel,
        calibration: DataLike,
        test: DataLike | None,
        task: Task | None,
        options: CalibrationOptions,
    ) -> CalibrationState:
        """Check the request, split the calibration data and measure the full model on it.

        Raises:
            ValueError: ``against="extractable"`` on a task other than classification.
            CalibrationError: a tier with a cost budget on a model without compute strategies.
        """
        started = time.perf_counter()
        if options.against == "extractable" and model.task != "classification":
            raise ValueError(
                f"against='extractable' covers classification; this model's task is {model.task!r}"
            )
        tiers = [t for t in model.tiers.values() if not t.is_full]
        budgeted = [t.name for t in tiers if t.max_cost is not None]
        if budgeted and not model.compute:
            raise CalibrationError(
                f"tiers {budgeted} have a cost budget (max_cost) but the model has no compute "
                "strategy to save work with; pass compute='auto' (CLI: --compute)"
            )
        task = task or get_task(model.task)
        cal = as_split(calibration, "calibration")
        fitted = [s for s in model.degrading.values() if getattr(s, "needs_labels", False)]
        search, land = halves(cal) if model.compute or fitted else (cal, cal)
        runner = SplitRunner(model, land.inputs, task.read, options.batch_size)
        curve = StrengthCurve(model, runner, land.labels, task)
        base = (
            curve.base
            if land is cal
            else task.score(
                SplitRunner(model, cal.inputs, task.read, options.batch_size).full_logits(),
                cal.labels,
            )
        )
        return cls(
            model=model,
            task=task,
            calibration=cal,
            test=as_split(test, "test") if test is not None else None,
            options=options,
            search=search,
            land=land,
            tiers=tiers,
            fitted=fitted,
            curve=curve,
            base=base,
            tolerance=0.5 / task.sample_count(land.labels),
            progress=tqdm(
                total=len(tiers), desc="calibrating", disable=not options.progress, unit="tier"
            ),
            started=started,
        )

    def headroom(self, target: float) -> float:
        """Utility a compute setting must keep above ``target``: one standard error by default.

        The cheapest of many settings tends to have been lucky on the search half; the margin
        keeps that luck from becoming a tier that misses its target on new data.
        """
        if self.options.headroom is not None:
            return self.options.headroom
        n = self.task.sample_count(self.search.labels) * self.independent_share
        return math.sqrt(max(target * (1 - target), 1e-12) / n)

    @property
    def independent_share(self) -> float:
        """The share of the samples that count as independent (below 1 where they come in
        correlated groups: tokens of one passage), measured on the full model's answers to the
        landing half (:meth:`~nnobfuscator.tasks.base.Task.effective_count`)."""
        labels = self.land.labels
        full = self.curve.runner.full_logits()
        return self.task.effective_count(full, labels) / max(self.task.sample_count(labels), 1)
