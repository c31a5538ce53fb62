"""Calibration: per tier, the cheapest compute setting, then the strength that hits the target.

With compute strategies, each tier first gets the cheapest setting whose calibration metric still
clears its target plus a headroom (:mod:`nnobfuscator.calibration.compute_search`), within its ``max_cost``.
Then all degrading strategies share one knob per tier, ``u`` in [0, 1] (each strategy's strength
is ``u * max_strength``). The metric falls as ``u`` grows, so each tier's ``u`` is found by a
safeguarded regula-falsi bisection on a split whose unchanging prefix is cached
(:class:`~nnobfuscator.calibration.runner.SplitRunner`). Then every tier is measured on the held-out split.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from nnobfuscator.calibration.compute_search import ComputeSearch
from nnobfuscator.calibration.extractable import hold_extractable
from nnobfuscator.calibration.report import build_report
from nnobfuscator.calibration.runner import SettingRunner, SplitRunner
from nnobfuscator.calibration.strength import StrengthCurve, search_knob, set_knob
from nnobfuscator.core.data import DataLike, Split, as_split
from nnobfuscator.core.outputs import select
from nnobfuscator.core.tiers import Tier
from nnobfuscator.tasks import Task, get_task
from nnobfuscator.tiered.cost import relative_costs, tier_latency_ms
from nnobfuscator.tiered.model import TieredModel

logger = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """A tier target cannot be reached; the message names the reachable range."""


def _fit_to_tiers(
    model: TieredModel,
    strategies: list[Any],
    tiers: list[Tier],
    data: Split,
    task: Task,
    batch_size: int,
) -> None:
    """Fit the strategies that learn from labelled data (class-merge's order and readouts) on
    ``data`` (the search half), each tier at its compute setting."""
    runner = SplitRunner(model, data.inputs, task.read, batch_size)
    predicted = runner.full_logits().argmax(dim=1)
    classes = int(runner.full_logits().shape[1])
    for strategy in strategies:
        strategy.fit_order(predicted, data.labels, classes)
        for tier in tiers:
            set_knob(model, tier.name, 0.0)
            strategy.forget(tier.name)  # features from the tier's own layers and the model's head
            features = strategy.head_inputs(lambda t=tier.name: runner.logits(t))
            strategy.fit_tier(tier.name, features, data.labels)


#: how many times a tier whose fitted readout falls short of its target asks the compute search
#: for a costlier setting before calibration gives up
_REFITS = 4


def _headroom(target: float, n: int, headroom: float | None) -> float:
    """Utility a compute setting must keep above the target: one standard error by default.

    The cheapest of many settings tends to have been lucky on the calibration split; the margin
    keeps that luck from becoming a tier that misses its target on new data.
    """
    if headroom is not None:
        return headroom
    return math.sqrt(max(target * (1 - target), 1e-12) / n)


def _choose_compute(
    search: ComputeSearch,
    tier: Tier,
    target: float,
    required: float,
    metric: str,
    start: dict[str, Any] | None = None,
) -> tuple[float, dict[str, Any]]:
    """Set ``tier``'s cheapest compute setting, descending from ``start`` (a stricter tier's);
    its calibration utility and settings are returned.

    Raises:
        CalibrationError: the tier's cost budget cannot be met at its target.
    """
    point = search.cheapest(tier.name, required, start)
    if tier.max_cost is not None and point.cost > tier.max_cost + 1e-9:
        raise CalibrationError(
            f"tier {tier.name!r}: target {metric} {target:.3f} and budget max_cost="
            f"{tier.max_cost:g} conflict: the cheapest setting found that keeps {metric} >= "
            f"{required:.3f} costs {point.cost:.3f} of the full model. Lower the target, raise "
            "max_cost, or add compute strategies"
        )
    return point.utility, point.settings


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


def calibrate(
    model: TieredModel,
    calibration: DataLike,
    test: DataLike | None = None,
    *,
    dataset: str = "custom",
    batch_size: int = 256,
    max_evals: int = 16,
    headroom: float | None = None,
    beam: int = 1,
    progress: bool = True,
    task: Task | None = None,
    against: str = "face",
    queries: Sequence[int] = (300, 1000),
    pool: DataLike | None = None,
    build_copy: Callable[[], nn.Module] | None = None,
    recipe: Any = None,
    margin: float = 0.03,
) -> dict[str, Any]:
    """Calibrate every tier of ``model`` on ``calibration`` and measure it on ``test``.

    Sets each tier's parameters, ``target_value``, ``metrics`` and ``relative_cost`` in place.

    Args:
        headroom: with compute strategies, how far above its target a tier's compute setting must
            keep the calibration metric (default: one standard error of the target).
        beam: beam width of the compute search (1: a lazily evaluated greedy descent).
        task: the task that scores outputs; by default the model's task with default options
            (text-to-image needs one with its judge: ``TextToImageTask(judge=...)``).
        against: ``"face"`` lands each tier's metric on its target; ``"extractable"`` also
            measures, per budget in ``queries``, what a user of each tier extracts with that many
            labels (:mod:`nnobfuscator.extraction.extract`: decoding its answers, and a knock-off
            trained on them when ``build_copy`` is given) and requires it to stay at or below
            ``max(target, labels-only) + margin`` (classification): measured on the calibration
            split's landing half, a tier over it is set stronger, at most ``margin`` below its
            target; the report's rows are measured on ``test``.
        pool: the attacker's images for ``against="extractable"`` (never the test split; by
            default the calibration split's search half).
        build_copy: an untrained copy of the architecture (the knock-off); ``None`` measures
            decoding only (seconds instead of minutes).
        recipe: how copies train (:class:`~nnobfuscator.extraction.extract.CopyRecipe`).

    Returns:
        The report (a dict matching ``report.schema.json``).

    Raises:
        CalibrationError: a target above the full model or below what the strategy reaches, a
            target and a ``max_cost`` budget that conflict, or (``against="extractable"``) a tier
            whose user extracts more than the bound.
    """
    if against not in ("face", "extractable"):
        raise ValueError(f"against must be 'face' or 'extractable', got {against!r}")
    if against == "extractable" and model.task != "classification":
        raise ValueError(
            f"against='extractable' covers classification; this model's task is {model.task!r}"
        )
    task = task or get_task(model.task)
    cal = as_split(calibration, "calibration")
    started = time.perf_counter()
    # With compute strategies the search picks the cheapest of many settings, whose score on
    # the data it was picked on is optimistic: it searches on one half of the split, and the
    # strengths land the targets on the other half.
    fitted = [s for s in model.degrading.values() if getattr(s, "needs_labels", False)]
    search_part, land_part = halves(cal) if model.compute or fitted else (cal, cal)
    runner = SplitRunner(model, land_part.inputs, task.read, batch_size)
    curve = StrengthCurve(model, runner, land_part.labels, task)
    base = (
        curve.base
        if land_part is cal
        else task.score(
            SplitRunner(model, cal.inputs, task.read, batch_size).full_logits(), cal.labels
        )
    )
    tolerance = 0.5 / task.sample_count(land_part.labels)
    tiers = [t for t in model.tiers.values() if not t.is_full]
    budgeted = [t.name for t in tiers if t.max_cost is not None]
    if budgeted and not model.compute:
        raise CalibrationError(
            f"tiers {budgeted} have a cost budget (max_cost) but the model has no compute "
            "strategy to save work with; pass compute='auto' (CLI: --compute)"
        )
    bar = tqdm(tiers, desc="calibrating", disable=not progress, unit="tier")
    search = None
    if model.compute:
        search_runner = SettingRunner(model, search_part.inputs, task.read, batch_size)
        for strategy in model.compute.values():
            strategy.fit(lambda batch: model.forward_tier(batch, None), search_runner.batches)
        bar.set_postfix_str("measuring the full model for the compute search")
        search = ComputeSearch(
            model,
            search_runner,
            search_part.labels,
            task,
            beam=beam,
            report=bar.set_postfix_str,
        )
    for tier in tiers:
        target = tier.target.resolve(base)
        assert target is not None
        tier.target_value = target
        if target > base + tolerance:
            raise CalibrationError(
                f"tier {tier.name!r}: target {target:.3f} is above the full model's "
                f"{task.metric} {base:.3f} on the calibration split; use 'full' or a lower target"
            )
        set_knob(model, tier.name, 0.0)
    compute_utility: dict[str, float] = {}
    if search is not None:
        # strictest tier first; each looser tier continues the descent where the last one stopped
        required = {
            t.name: min(
                t.target_value
                + _headroom(t.target_value, task.sample_count(search_part.labels), headroom),
                base,
            )
            for t in tiers
        }
        start = None
        for tier in sorted(tiers, key=lambda t: -required[t.name]):
            utility, start = _choose_compute(
                search, tier, tier.target_value, required[tier.name], task.metric, start
            )
            compute_utility[tier.name] = utility
    if fitted:
        _fit_to_tiers(model, fitted, tiers, search_part, task, batch_size)
    knobs: dict[str, float] = {}
    for tier in bar:
        target = tier.target_value
        curve.start(tier.name, compute_utility.get(tier.name), own=bool(fitted))
        refits = _REFITS if fitted and search is not None else 0
        for attempt in range(refits):
            # a readout fitted on the search half can answer below what the compute search saw
            # with the model's own head: ask for a setting that keeps that much more, and refit;
            # the last try asks for all of the full model's utility (at worst, no compute saving)
            shortfall = target - curve(tier.name, 0.0)
            if shortfall <= tolerance or required[tier.name] >= base:
                break
            raised = required[tier.name] + shortfall + tolerance
            required[tier.name] = base if attempt == refits - 1 else min(raised, base)
            compute_utility[tier.name], _ = _choose_compute(
                search, tier, target, required[tier.name], task.metric
            )
            _fit_to_tiers(model, fitted, [tier], search_part, task, batch_size)
            curve.start(tier.name, compute_utility[tier.name], own=True)
        if fitted and target > curve(tier.name, 0.0) + tolerance:
            raise CalibrationError(
                f"tier {tier.name!r}: target {target:.3f} is above what "
                f"{'+'.join(s.name for s in fitted)} answers at strength 0 "
                f"({curve(tier.name, 0.0):.3f}); lower the target"
            )
        if not model.degrading:  # compute-only tiers land where their cheapest setting does
            knobs[tier.name] = 0.0
            tier.metrics["calibration"] = curve(tier.name, 0.0)
            if tier.metrics["calibration"] > target + tolerance:
                warnings.warn(
                    f"tier {tier.name!r} lands at {task.metric} {tier.metrics['calibration']:.3f}, "
                    f"above its target {target:.3f}: compute settings move in steps and no "
                    "degrading strategy lands it between them (strategy='none')",
                    stacklevel=2,
                )
            continue
        bar.set_postfix_str(f"{tier.name}: bisecting the degrading strength")
        floor = curve(tier.name, 1.0)
        if target < floor - tolerance:
            raise CalibrationError(
                f"tier {tier.name!r}: target {target:.3f} is below what "
                f"{'+'.join(model.degrading)} reaches at full strength ({floor:.3f}); "
                f"reachable {task.metric} range is [{floor:.3f}, {base:.3f}]. Raise the target, "
                "add target layers, or combine strategies (e.g. feature-mix+logit-noise)"
            )
        knobs[tier.name] = search_knob(curve, tier.name, target, tolerance, max_evals)
        set_knob(model, tier.name, knobs[tier.name])
        tier.metrics["calibration"] = curve.points(tier.name)[knobs[tier.name]]
        bar.set_postfix(
            tier=tier.name,
            knob=f"{knobs[tier.name]:.3f}",
            metric=f"{tier.metrics['calibration']:.3f}",
        )
    extractable: dict[str, Any] = {"tiers": [{"name": t.name} for t in tiers]}
    if against == "extractable":
        overruns = hold_extractable(
            model,
            extractable,
            curve,
            knobs,
            tolerance=tolerance,
            max_evals=max_evals,
            pool=as_split(pool, "pool") if pool is not None else search_part,
            check=land_part,
            test=as_split(test, "test") if test is not None else None,
            queries=queries,
            build_copy=build_copy,
            recipe=recipe,
            margin=margin,
            progress=progress,
        )
        if overruns:
            raise CalibrationError(
                "their users extract more than the tiers show, on calibration data and with each "
                f"tier set up to {100 * margin:.0f} points below its target: "
                + "; ".join(map(str, overruns))
                + ". Use a strategy that withholds (class-merge, the default for classifiers) "
                "or answer less (answer_format top1 or label)"
            )
    for strategy in fitted:
        strategy.finish()
    for name, reason in (search.refused if search is not None else {}).items():
        warnings.warn(
            f"{name}: the model does not run with some of its settings, which were skipped "
            f"({reason})",
            stacklevel=2,
        )
    for tier in model.tiers.values():
        if tier.is_full:
            tier.target_value = None
            tier.metrics["calibration"] = base
    calibration_s = time.perf_counter() - started
    if search is not None:
        passes = search.runner.stage_samples / (len(search_part) * len(search.runner.stages))
        logger.info(
            "compute search: %s, %.1f equivalent passes over the calibration split",
            search.counts,
            passes,
        )
    report = evaluate(
        model,
        test if test is not None else cal,
        dataset=dataset,
        batch_size=batch_size,
        calibration_size=task.sample_count(cal.labels),
        base_calibration=base,
        calibration_s=calibration_s,
        task=task,
    )
    if against == "extractable":
        measured = {row["name"]: row["extractable"] for row in extractable["tiers"]}
        for row in report["tiers"]:
            if row["name"] in measured:
                row["extractable"] = measured[row["name"]]
        report.setdefault("settings", {})["extractable"] = extractable["settings"]["extractable"]
    return report


def evaluate(
    model: TieredModel,
    test: DataLike,
    *,
    dataset: str = "custom",
    batch_size: int = 256,
    calibration_size: int | None = None,
    base_calibration: float | None = None,
    calibration_s: float | None = None,
    task: Task | None = None,
) -> dict[str, Any]:
    """Measure every (calibrated) tier on ``test`` and return the report.

    Calibration-split figures are taken from the tiers' stored metrics.
    """
    task = task or get_task(model.task)
    split = as_split(test, "test")
    started = time.perf_counter()
    runner = SplitRunner(model, split.inputs, task.read, batch_size)
    full_logits = runner.full_logits()
    base_test = task.score(full_logits, split.labels)
    n_test = task.sample_count(split.labels)
    n_cal = calibration_size or model.meta.get("splits", {}).get("calibration", n_test)
    results: dict[str, dict[str, Any]] = {}
    for name, tier in model.tiers.items():
        if not model.is_calibrated(name):
            raise CalibrationError(f"tier {name!r} is not calibrated; run calibrate() first")
        logits = full_logits if tier.is_full else runner.logits(name)
        tier.metrics["test"] = task.score(logits, split.labels)
        results[name] = task.extra(logits, split.labels, full_logits)
        if tier.target_value is not None:
            results[name].update(
                _target_gap(tier.metrics["test"], tier.target_value, n_cal, n_test)
            )
    for name, cost in relative_costs(model, split.head(1)).items():
        model.tiers[name].relative_cost = cost
    for name, latency in tier_latency_ms(model, split.head(64), repeats=3).items():
        results[name]["latency_ms"] = latency
    meta = model.meta
    meta.setdefault("dataset", dataset)
    meta["splits"] = {"calibration": n_cal, "test": n_test}
    meta["base"] = {
        "calibration": base_calibration
        if base_calibration is not None
        else meta.get("base", {}).get("calibration", base_test),
        "test": base_test,
    }
    return build_report(
        model,
        task,
        extra=results,
        timings={
            **({"calibration_s": round(calibration_s, 3)} if calibration_s is not None else {}),
            "eval_s": round(time.perf_counter() - started, 3),
        },
    )


def _target_gap(achieved: float, target: float, n_cal: int, n_test: int) -> dict[str, float]:
    """How far the test metric landed from the target, and two standard errors of that gap.

    The gap's spread comes from sampling both splits: ``sqrt(p (1 - p) (1/n_cal + 1/n_test))``.
    """
    spread = math.sqrt(max(target * (1 - target), 1e-12) * (1 / n_cal + 1 / n_test))
    return {"target_gap": achieved - target, "two_se": 2 * spread}
