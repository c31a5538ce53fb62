"""The cheapest compute setting of a tier whose utility still clears its target.

A beam search over the steps the compute strategies offer (skip one more block, keep fewer
channels in one more stage, shrink the input once more). Each candidate is scored on the cached
calibration split and costed in FLOPs with ``torch.utils.flop_counter``; among the candidates that
keep utility at or above the requirement, the beam keeps those that lose the least utility per unit
of cost saved. Evaluations are memoised across tiers (they do not depend on the tier's name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from nnobfuscator.cost import tier_flops
from nnobfuscator.model import TieredModel
from nnobfuscator.outputs import select
from nnobfuscator.runner import SplitRunner
from nnobfuscator.strategies.compute import Setting
from nnobfuscator.tasks import Task

Settings = dict[str, Setting]


@dataclass
class ComputePoint:
    """One evaluated compute setting: per-strategy settings, utility and relative FLOPs."""

    settings: Settings
    utility: float
    cost: float


class ComputeSearch:
    """Evaluates and searches compute settings of a tiered model on one calibration split.

    Args:
        model: the tiered model (with compute strategies).
        runner: a :class:`SplitRunner` over the calibration images.
        labels: the calibration labels.
        task: the task (metric).
        beam: how many candidates survive each step (1: greedy).
    """

    def __init__(
        self,
        model: TieredModel,
        runner: SplitRunner,
        labels: torch.Tensor,
        task: Task,
        *,
        beam: int = 2,
    ) -> None:
        self.model, self.runner, self.labels, self.task = model, runner, labels, task
        self.beam = max(1, beam)
        self.sample = select(runner.batches[0], torch.arange(1))
        self.full_flops = max(tier_flops(model, self.sample, None), 1)
        self.memo: dict[str, ComputePoint | None] = {}
        self.failures: dict[str, str] = {}
        #: per compute strategy, why one of its steps could not run (e.g. a ViT's fixed size)
        self.refused: dict[str, str] = {}

    def apply(self, tier: str, settings: Settings) -> None:
        for name, setting in settings.items():
            self.model.set_setting(tier, name, setting)

    def evaluate(self, tier: str, settings: Settings) -> ComputePoint | None:
        """Utility and cost of ``settings`` (``None`` when the model cannot run with them)."""
        key = json.dumps(settings, sort_keys=True)
        if key not in self.memo:
            self.apply(tier, settings)
            try:
                utility = self.task.score(self.runner.logits(tier), self.labels)
                cost = tier_flops(self.model, self.sample, tier) / self.full_flops
                self.memo[key] = ComputePoint(settings, utility, cost)
            # e.g. an input shrunk below what the model takes (ViT asserts its image size)
            except (RuntimeError, ValueError, AssertionError) as error:
                self.failures[key] = str(error).splitlines()[0]
                self.memo[key] = None
        return self.memo[key]

    def start(self) -> Settings:
        return {name: s.default_setting() for name, s in self.model.compute.items()}

    def cheapest(self, tier: str, required: float) -> ComputePoint:
        """The cheapest setting found whose calibration utility is at least ``required``.

        Leaves ``tier`` set to it. The default setting (saving nothing) is the fallback.
        """
        best = self.evaluate(tier, self.start())
        if best is None:
            raise RuntimeError("the model does not run with its default compute setting")
        frontier = [best]
        while frontier:
            candidates: dict[str, tuple[float, ComputePoint]] = {}
            for point in frontier:
                for name, strategy in self.model.compute.items():
                    for option in strategy.cheaper(point.settings[name]):
                        settings = {**point.settings, name: option}
                        key = json.dumps(settings, sort_keys=True)
                        if key in candidates:
                            continue
                        found = self.evaluate(tier, settings)
                        if found is None and key in self.failures:
                            self.refused.setdefault(name, self.failures[key])
                        if found is None or found.utility < required:
                            continue
                        saved = point.cost - found.cost
                        if saved <= 1e-9:
                            continue
                        candidate = ComputePoint(settings, found.utility, found.cost)
                        candidates[key] = ((point.utility - found.utility) / saved, candidate)
            ranked = sorted(candidates.values(), key=lambda item: (item[0], item[1].cost))
            frontier = [point for _, point in ranked[: self.beam]]
            for point in frontier:
                if (point.cost, -point.utility) < (best.cost, -best.utility):
                    best = point
        self.apply(tier, best.settings)
        return best
