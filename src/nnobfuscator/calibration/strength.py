"""The one knob per tier that all degrading strategies share, and the search along it.

Each strategy's strength is ``u * max_strength`` for a tier's knob ``u`` in [0, 1]; the metric
falls as ``u`` grows, and :func:`search_knob` finds the ``u`` whose metric is closest to a target
by a safeguarded regula-falsi bisection over the memoised curve.
"""

from __future__ import annotations

import torch

from nnobfuscator.calibration.runner import SplitRunner
from nnobfuscator.tasks import Task
from nnobfuscator.tiered.model import TieredModel


class StrengthCurve:
    """The metric on the calibration split as a function of the shared knob ``u`` (memoised).

    The curve of tiers without a compute setting is shared; a tier with one gets its own.
    """

    def __init__(self, model: TieredModel, runner: SplitRunner, labels: torch.Tensor, task: Task):
        self.model, self.runner, self.labels, self.task = model, runner, labels, task
        self.base = task.score(runner.full_logits(), labels)
        self._shared: dict[float, float] = {0.0: self.base}
        self._own: dict[str, dict[float, float]] = {}

    def start(self, tier: str, utility_at_zero: float | None, own: bool = False) -> None:
        """Begin the curve of ``tier``; ``utility_at_zero`` when its compute setting saves work;
        ``own``: the tier's curve is its own (a strategy fit to it), measured from the start."""
        if own:
            self._own[tier] = {}
            self(tier, 0.0)
        elif utility_at_zero is not None:
            self._own[tier] = {0.0: utility_at_zero}

    def points(self, tier: str) -> dict[float, float]:
        return self._own.get(tier, self._shared)

    def __call__(self, tier: str, u: float) -> float:
        u = round(u, 6)
        points = self.points(tier)
        if u not in points:
            set_knob(self.model, tier, u)
            points[u] = self.task.score(self.runner.logits(tier), self.labels)
        return points[u]


def set_knob(model: TieredModel, tier: str, u: float) -> None:
    for name, strategy in model.degrading.items():
        model.set_strength(tier, name, u * strategy.max_strength)


def search_knob(
    curve: StrengthCurve, tier: str, target: float, tolerance: float, max_evals: int
) -> float:
    """The knob whose metric is closest to ``target`` (the curve falls as the knob grows)."""
    points = curve.points(tier)
    for _ in range(max_evals):
        above = [u for u, m in points.items() if m >= target]
        below = [u for u, m in points.items() if m < target]
        best = min(points, key=lambda u: (abs(points[u] - target), u))
        if abs(points[best] - target) <= tolerance or not below:
            return best
        lo = max((u for u in above if u < min(below)), default=0.0)
        hi = min(u for u in below if u > lo)
        width = hi - lo
        if width < 1e-4:
            return best
        f_lo, f_hi = points[lo], points[hi]
        guess = lo + width * (f_lo - target) / max(f_lo - f_hi, 1e-12)
        curve(tier, min(max(guess, lo + 0.15 * width), hi - 0.15 * width))
    return min(points, key=lambda u: (abs(points[u] - target), u))
