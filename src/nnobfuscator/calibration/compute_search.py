"""The cheapest compute setting of a tier whose utility still clears its target.

A beam search over the steps the compute strategies offer (skip one more block, keep fewer
channels in one more stage, shrink the input once more). Each candidate runs on the calibration
split with its BatchNorm statistics re-estimated for it (:class:`~nnobfuscator.calibration.runner.
SettingRunner`: the first batch measures them, its activations are reused by every candidate
that shares a prefix of the network) and is costed in FLOPs with ``torch.utils.flop_counter``.
Among the candidates that keep utility at or above the requirement, the beam keeps those that
lose the least utility per unit of cost saved.

Work is saved three ways: evaluations are memoised across tiers; a candidate whose measuring batch
already falls far below the requirement is not run on the rest (*screened*); a candidate that saves
everything a failed setting saves, and more, is not run at all (*pruned*: utility falls as more is
saved).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nnobfuscator.calibration.runner import SettingRunner
from nnobfuscator.strategies.bn_reestimate import Stats
from nnobfuscator.strategies.compute import Setting
from nnobfuscator.tasks import Task
from nnobfuscator.tiered.model import TieredModel

Settings = dict[str, Setting]
#: a candidate whose measuring batch is this many standard errors below the requirement is dropped
SCREEN_SE = 2.5


@dataclass
class ComputePoint:
    """One evaluated compute setting: per-strategy settings, utility and relative FLOPs.

    ``screened_at`` is set when only the measuring batch ran: ``utility`` is then that batch's,
    and the point is known to fail any requirement at or above ``screened_at``. ``cost`` is NaN
    while the point has met no requirement (its FLOPs were not counted).
    """

    settings: Settings
    utility: float
    cost: float
    stats: Stats = field(default_factory=dict, repr=False)
    screened_at: float | None = None
    signatures: list[tuple] = field(default_factory=list, repr=False)


@dataclass
class SearchCounts:
    """What the search did (load-independent): candidates run in full, screened, pruned, found
    in the memo, and costed (FLOPs counted: only candidates that met a requirement)."""

    evaluated: int = 0
    screened: int = 0
    pruned: int = 0
    memo_hits: int = 0
    costed: int = 0


#: default least FLOPs share a step that splits mixed-tier passes must save (see ComputeSearch)
MIN_SPLIT_SAVING = 0.02


class ComputeSearch:
    """Evaluates and searches compute settings of a tiered model on one calibration split.

    Args:
        model: the tiered model (with compute strategies).
        runner: a :class:`SettingRunner` over the calibration inputs.
        labels: the calibration labels.
        task: the task (metric).
        beam: how many candidates survive each step (1: lazy greedy, see :meth:`_lazy`).
        screen: drop candidates whose measuring batch is far below the requirement.
        min_split_saving: a step of a strategy whose settings cannot share a forward pass
            (input size, channel width) must save at least this share of the full model's
            FLOPs: each distinct setting costs a pass of its own in a batch mixing tiers.
        report: called with a short line after each candidate (progress).
    """

    def __init__(
        self,
        model: TieredModel,
        runner: SettingRunner,
        labels: torch.Tensor,
        task: Task,
        *,
        beam: int = 1,
        screen: bool = True,
        min_split_saving: float = MIN_SPLIT_SAVING,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.model, self.runner, self.labels, self.task = model, runner, labels, task
        self.min_split_saving = min_split_saving
        self.beam = max(1, beam)
        self.screen = screen
        self.report = report
        self.full_flops = max(runner.flops(None, runner.signatures({})), 1)
        self.memo: dict[str, ComputePoint | None] = {}
        self.failures: dict[str, str] = {}
        self.counts = SearchCounts()
        #: per move, its last known utility lost per unit of cost saved (lazy greedy)
        self.ratios: dict[str, float] = {}
        #: per compute strategy, why one of its steps could not run (e.g. a ViT's fixed size)
        self.refused: dict[str, str] = {}

    def apply(self, tier: str, settings: Settings, stats: Stats | None = None) -> None:
        """Set ``tier``'s compute settings, with the BatchNorm statistics measured for them."""
        for name, setting in settings.items():
            self.model.set_setting(tier, name, setting)
        if self.runner.store is not None:
            if stats:
                self.runner.store.install(tier, stats)
            else:
                self.runner.store.clear(tier)

    def changes(self, settings: Settings) -> dict[str, object]:
        found: dict[str, object] = {}
        for name, strategy in self.model.compute.items():
            for module, change in strategy.changes(settings[name]).items():
                found[module] = [found[module], change] if module in found else change
        return found

    def evaluate(self, tier: str, settings: Settings, required: float = 0.0) -> ComputePoint | None:
        """Utility and cost of ``settings`` (``None`` when the model cannot run with them).

        A candidate may be screened: see :class:`ComputePoint`. FLOPs are counted only for a
        candidate that meets ``required`` (``cost`` is NaN until then).
        """
        key = json.dumps(settings, sort_keys=True)
        known = self.memo.get(key, False)
        if known is not False and (
            known is None or known.screened_at is None or required >= known.screened_at
        ):
            self.counts.memo_hits += 1
            if known is not None and known.screened_at is None and known.utility >= required:
                self._cost(tier, known)
            return known
        self.apply(tier, settings)
        signatures = self.runner.signatures(self.changes(settings))
        try:
            logits, stats = self.runner.measure(tier, signatures)
            self.apply(tier, settings, stats)
            labels = self.labels[: len(logits)]
            utility = self.task.score(logits, labels)
            point = ComputePoint(settings, utility, math.nan, stats, signatures=signatures)
            measured = self.task.sample_count(labels)
            if len(logits) < len(self.labels) and self._hopeless(utility, required, measured):
                point.screened_at = required
                self.counts.screened += 1
            else:
                logits = torch.cat([logits, *self.runner.rest(tier, signatures)])
                point.utility = self.task.score(logits, self.labels)
                self.counts.evaluated += 1
                if point.utility >= required:
                    self._cost(tier, point)
            self.memo[key] = point
        # e.g. an input shrunk below what the model takes (ViT asserts its image size)
        except (RuntimeError, ValueError, AssertionError) as error:
            self.failures[key] = str(error).splitlines()[0]
            self.memo[key] = None
        return self.memo[key]

    def _cost(self, tier: str, point: ComputePoint) -> None:
        """Count ``point``'s FLOPs (once; stages shared with counted settings are reused)."""
        if not math.isnan(point.cost):
            return
        for name, setting in point.settings.items():
            self.model.set_setting(tier, name, setting)
        point.cost = self.runner.flops(tier, point.signatures) / self.full_flops
        self.counts.costed += 1

    def curve(self) -> list[dict[str, float]]:
        """Every costed setting the search ran, cheapest first: its relative FLOPs and its
        utility on the search split (the metric against cost that the strategies reach)."""
        points = [p for p in self.memo.values() if p is not None and not math.isnan(p.cost)]
        return [
            {"cost": round(p.cost, 4), "utility": round(p.utility, 4)}
            for p in sorted(points, key=lambda p: (p.cost, -p.utility))
        ]

    def _hopeless(self, utility: float, required: float, n: int) -> bool:
        if not self.screen:
            return False
        spread = math.sqrt(max(required * (1 - required), 0.01) / n)
        return utility < required - SCREEN_SE * spread

    def start(self) -> Settings:
        return {name: s.default_setting() for name, s in self.model.compute.items()}

    def _covers_failure(self, settings: Settings, failed: list[Settings]) -> bool:
        strategies = self.model.compute
        return any(
            all(strategies[name].covers(settings[name], other[name]) for name in strategies)
            for other in failed
        )

    def _say(self, tier: str, best: ComputePoint) -> None:
        if self.report is not None:
            c = self.counts
            self.report(
                f"{tier}: compute search, {c.evaluated} run, {c.screened} screened, "
                f"{c.pruned} pruned; cheapest so far {best.cost:.2f} of full FLOPs"
            )

    def cheapest(self, tier: str, required: float, start: Settings | None = None) -> ComputePoint:
        """The cheapest setting found whose calibration utility is at least ``required``.

        Leaves ``tier`` set to it (with its BatchNorm statistics). The search descends from
        ``start`` (a setting found for a stricter requirement: tiers searched from the strictest
        down continue one descent) or else from the default setting, which is the fallback.
        """
        best = self.evaluate(tier, start) if start is not None else None
        if best is None or best.screened_at is not None or best.utility < required:
            best = self.evaluate(tier, self.start())
        if best is None:
            raise RuntimeError("the model does not run with its default compute setting")
        best = (
            self._beam(tier, required, best) if self.beam > 1 else self._lazy(tier, required, best)
        )
        self.apply(tier, best.settings, best.stats)
        return best

    def _moves(self, point: ComputePoint) -> list[tuple[str, str, Settings]]:
        """The settings one step cheaper than ``point``'s, each with a key naming its move (what
        it changes further), stable from one point to the next."""
        before = {
            k: json.dumps(v, sort_keys=True, default=str)
            for k, v in self.changes(point.settings).items()
        }
        moves = []
        for name, strategy in self.model.compute.items():
            for option in strategy.cheaper(point.settings[name]):
                settings = {**point.settings, name: option}
                after = self.changes(settings)
                diff = sorted(
                    (k, json.dumps(v, sort_keys=True, default=str))
                    for k, v in after.items()
                    if before.get(k) != json.dumps(v, sort_keys=True, default=str)
                )
                moves.append((json.dumps([name, diff]), name, settings))
        return moves

    def _lazy(self, tier: str, required: float, best: ComputePoint) -> ComputePoint:
        """Greedy descent, evaluated lazily: each step takes the move losing the least utility per
        unit of cost saved, re-evaluating moves in the order of their last known ratio and
        stopping once no stale ratio can beat the best fresh one (ratios grow as more is saved)."""
        failed: list[Settings] = []
        point = best
        while True:
            moves = self._moves(point)
            moves.sort(key=lambda move: self.ratios.get(move[0], -math.inf))
            chosen: tuple[float, ComputePoint] | None = None
            for key, name, settings in moves:
                if chosen is not None and chosen[0] <= self.ratios.get(key, -math.inf):
                    break
                if self._covers_failure(settings, failed):
                    self.counts.pruned += 1
                    continue
                found = self.evaluate(tier, settings, required)
                if found is None or found.screened_at is not None or found.utility < required:
                    self._refusal(found, name, settings)
                    failed.append(settings)
                    continue
                saved = point.cost - found.cost
                if saved <= self._least_saving(name):
                    continue
                ratio = (point.utility - found.utility) / saved
                self.ratios[key] = ratio
                if chosen is None or (ratio, found.cost) < (chosen[0], chosen[1].cost):
                    chosen = (ratio, found)
                self._say(tier, best)
            if chosen is None:
                return best
            point = chosen[1]
            if (point.cost, -point.utility) < (best.cost, -best.utility):
                best = point

    def _least_saving(self, name: str) -> float:
        """What a step of strategy ``name`` must save to be taken (a step that splits mixed
        passes must pay for its pass)."""
        strategy = self.model.compute[name]
        return 1e-9 if getattr(strategy, "shares_passes", False) else self.min_split_saving

    def _refusal(self, found: ComputePoint | None, name: str, settings: Settings) -> None:
        key = json.dumps(settings, sort_keys=True)
        if found is None and key in self.failures:
            self.refused.setdefault(name, self.failures[key])

    def _beam(self, tier: str, required: float, best: ComputePoint) -> ComputePoint:
        """Beam search: every move from each of the ``beam`` best points so far, each step."""
        frontier = [best]
        failed: list[Settings] = []
        while frontier:
            candidates: dict[str, tuple[float, ComputePoint]] = {}
            for point in frontier:
                for name, strategy in self.model.compute.items():
                    for option in strategy.cheaper(point.settings[name]):
                        settings = {**point.settings, name: option}
                        key = json.dumps(settings, sort_keys=True)
                        if key in candidates:
                            continue
                        if self._covers_failure(settings, failed):
                            self.counts.pruned += 1
                            continue
                        found = self.evaluate(tier, settings, required)
                        if found is None and key in self.failures:
                            self.refused.setdefault(name, self.failures[key])
                        if found is None or found.screened_at is not None:
                            failed.append(settings)
                            continue
                        if found.utility < required:
                            failed.append(settings)
                            continue
                        saved = point.cost - found.cost
                        if saved <= self._least_saving(name):
                            continue
                        candidates[key] = ((point.utility - found.utility) / saved, found)
                        self._say(tier, best)
            ranked = sorted(candidates.values(), key=lambda item: (item[0], item[1].cost))
            frontier = [point for _, point in ranked[: self.beam]]
            for point in frontier:
                if (point.cost, -point.utility) < (best.cost, -best.utility):
                    best = point
            self._say(tier, best)
        return best
