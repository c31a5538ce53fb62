"""The stages of a calibration, in order: resolve the targets, choose each tier's cheapest
compute setting, fit the readouts of strategies that learn from labels, land each tier's
strength on its target, and finish (the extractable hold and the measurement on the test split
are stages of their own, in :mod:`~nnobfuscator.calibration.extractable` and
:mod:`~nnobfuscator.calibration.calibrator`).

Each stage reads and writes one :class:`~nnobfuscator.calibration.state.CalibrationState`.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

from nnobfuscator.calibration.compute_search import ComputeSearch
from nnobfuscator.calibration.runner import SettingRunner, SplitRunner
from nnobfuscator.calibration.state import CalibrationError, CalibrationState
from nnobfuscator.calibration.strength import search_knob, set_knob
from nnobfuscator.core.tiers import Tier

logger = logging.getLogger(__name__)

#: how many times a tier whose fitted readout falls short of its target asks the compute search
#: for a costlier setting before calibration gives up
REFITS = 4


class Stage:
    """One step of a calibration."""

    def applies(self, state: CalibrationState) -> bool:
        """Whether this calibration needs the stage (default: always)."""
        return True

    def run(self, state: CalibrationState) -> None:
        raise NotImplementedError


class ResolveTargets(Stage):
    """Turn each tier's target into a value of the metric; refuse one above the full model."""

    def run(self, state: CalibrationState) -> None:
        for tier in state.tiers:
            target = tier.target.resolve(state.base)
            assert target is not None
            tier.target_value = target
            if target > state.base + state.tolerance:
                raise CalibrationError(
                    f"tier {tier.name!r}: target {target:.3f} is above the full model's "
                    f"{state.task.metric} {state.base:.3f} on the calibration split; use 'full' "
                    "or a lower target"
                )
            set_knob(state.model, tier.name, 0.0)


def choose_compute(
    state: CalibrationState, tier: Tier, start: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Set ``tier``'s cheapest compute setting that keeps ``state.required[tier]``, descending
    from ``start`` (a stricter tier's); records its utility and returns its settings.

    Raises:
        CalibrationError: the tier's cost budget cannot be met at its target.
    """
    required = state.required[tier.name]
    point = state.compute_search.cheapest(tier.name, required, start)
    if tier.max_cost is not None and point.cost > tier.max_cost + 1e-9:
        metric = state.task.metric
        raise CalibrationError(
            f"tier {tier.name!r}: target {metric} {tier.target_value:.3f} and budget max_cost="
            f"{tier.max_cost:g} conflict: the cheapest setting found that keeps {metric} >= "
            f"{required:.3f} costs {point.cost:.3f} of the full model. Lower the target, raise "
            "max_cost, or add compute strategies"
        )
    state.compute_utility[tier.name] = point.utility
    return point.settings


class ChooseCompute(Stage):
    """Fit the compute strategies, then give each tier the cheapest setting that keeps its target
    plus a headroom (:mod:`~nnobfuscator.calibration.compute_search`), strictest tier first: each
    looser tier continues the descent where the last one stopped."""

    def applies(self, state: CalibrationState) -> bool:
        return bool(state.model.compute)

    def run(self, state: CalibrationState) -> None:
        model, options = state.model, state.options
        runner = SettingRunner(model, state.search.inputs, state.task.read, options.batch_size)
        for strategy in model.compute.values():
            strategy.fit(lambda batch: model.forward_tier(batch, None), runner.batches)
        state.progress.set_postfix_str("measuring the full model for the compute search")
        state.compute_search = ComputeSearch(
            model,
            runner,
            state.search.labels,
            state.task,
            beam=options.beam,
            report=state.progress.set_postfix_str,
        )
        for tier in state.tiers:
            wanted = tier.target_value + state.headroom(tier.target_value)
            state.required[tier.name] = min(wanted, state.base)
        start = None
        for tier in sorted(state.tiers, key=lambda t: -state.required[t.name]):
            start = choose_compute(state, tier, start)


def fit_readouts(state: CalibrationState, tiers: list[Tier]) -> None:
    """Fit the strategies that learn from labelled data (class-merge's order and readouts) on
    the search half, each tier at its compute setting."""
    data, task = state.search, state.task
    runner = SplitRunner(state.model, data.inputs, task.read, state.options.batch_size)
    predicted = runner.full_logits().argmax(dim=1)
    classes = int(runner.full_logits().shape[1])
    for strategy in state.fitted:
        strategy.fit_order(predicted, data.labels, classes)
        for tier in tiers:
            set_knob(state.model, tier.name, 0.0)
            strategy.forget(tier.name)  # features from the tier's own layers and the model's head
            features = strategy.head_inputs(lambda t=tier.name: runner.logits(t))
            strategy.fit_tier(tier.name, features, data.labels)


class FitReadouts(Stage):
    """Fit the label-learning strategies per tier; a tier whose readout answers below its target
    at strength 0 asks the compute search for a costlier setting (``REFITS`` times, the last
    for all of the full model's utility) and refits."""

    def applies(self, state: CalibrationState) -> bool:
        return bool(state.fitted)

    def run(self, state: CalibrationState) -> None:
        fit_readouts(state, state.tiers)
        curve, tolerance = state.curve, state.tolerance
        for tier in state.tiers:
            curve.start(tier.name, state.compute_utility.get(tier.name), own=True)
            refits = REFITS if state.compute_search is not None else 0
            for attempt in range(refits):
                shortfall = tier.target_value - curve(tier.name, 0.0)
                if shortfall <= tolerance or state.required[tier.name] >= state.base:
                    break
                raised = min(state.required[tier.name] + shortfall + tolerance, state.base)
                state.required[tier.name] = state.base if attempt == refits - 1 else raised
                choose_compute(state, tier)
                fit_readouts(state, [tier])
                curve.start(tier.name, state.compute_utility[tier.name], own=True)
            reached = curve(tier.name, 0.0)
            if tier.target_value > reached + tolerance:
                raise CalibrationError(
                    f"tier {tier.name!r}: target {tier.target_value:.3f} is above what "
                    f"{'+'.join(s.name for s in state.fitted)} answers at strength 0 "
                    f"({reached:.3f}); lower the target"
                )


class LandStrengths(Stage):
    """Per tier, the shared knob of the degrading strategies whose calibration metric is closest
    to the target (:func:`~nnobfuscator.calibration.strength.search_knob`); compute-only tiers
    land where their cheapest setting does."""

    def run(self, state: CalibrationState) -> None:
        model, curve, tolerance, bar = state.model, state.curve, state.tolerance, state.progress
        metric = state.task.metric
        for tier in state.tiers:
            target = tier.target_value
            if not state.fitted:
                curve.start(tier.name, state.compute_utility.get(tier.name))
            if not model.degrading:
                state.knobs[tier.name] = 0.0
                tier.metrics["calibration"] = curve(tier.name, 0.0)
                if tier.metrics["calibration"] > target + tolerance:
                    warnings.warn(
                        f"tier {tier.name!r} lands at {metric} {tier.metrics['calibration']:.3f}, "
                        f"above its target {target:.3f}: compute settings move in steps and no "
                        "degrading strategy lands it between them (strategy='none')",
                        stacklevel=3,  # the caller of calibrate()
                    )
                bar.update(1)
                continue
            bar.set_postfix_str(f"{tier.name}: bisecting the degrading strength")
            floor = curve(tier.name, 1.0)
            if target < floor - tolerance:
                raise CalibrationError(
                    f"tier {tier.name!r}: target {target:.3f} is below what "
                    f"{'+'.join(model.degrading)} reaches at full strength ({floor:.3f}); "
                    f"reachable {metric} range is [{floor:.3f}, {state.base:.3f}]. Raise the "
                    "target, add target layers, or combine strategies (e.g. "
                    "feature-mix+logit-noise)"
                )
            knob = search_knob(curve, tier.name, target, tolerance, state.options.max_evals)
            state.knobs[tier.name] = knob
            set_knob(model, tier.name, knob)
            tier.metrics["calibration"] = curve.points(tier.name)[knob]
            bar.set_postfix(
                tier=tier.name, knob=f"{knob:.3f}", metric=f"{tier.metrics['calibration']:.3f}"
            )
            bar.update(1)


class Finish(Stage):
    """Let fitted strategies drop what they only needed to fit, warn about settings the model
    refused, give full tiers the full model's figure and stop the calibration clock."""

    def run(self, state: CalibrationState) -> None:
        for strategy in state.fitted:
            strategy.finish()
        search = state.compute_search
        for name, reason in (search.refused if search is not None else {}).items():
            warnings.warn(
                f"{name}: the model does not run with some of its settings, which were skipped "
                f"({reason})",
                stacklevel=3,  # the caller of calibrate()
            )
        for tier in state.model.tiers.values():
            if tier.is_full:
                tier.target_value = None
                tier.metrics["calibration"] = state.base
        state.calibration_s = time.perf_counter() - state.started
        if search is not None:
            runner = search.runner
            passes = runner.stage_samples / (len(state.search) * len(runner.stages))
            logger.info(
                "compute search: %s, %.1f equivalent passes over the calibration split",
                search.counts,
                passes,
            )
