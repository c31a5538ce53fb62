"""Calibration: per tier, the cheapest compute setting, then the strength that hits the target.

:func:`calibrate` hands one :class:`~nnobfuscator.calibration.state.CalibrationState` to its
stages in turn (:mod:`nnobfuscator.calibration.stages`): resolve the targets; with compute
strategies, give each tier the cheapest setting whose metric on one half of the calibration split
still clears its target plus a headroom (:mod:`~nnobfuscator.calibration.compute_search`); fit the
strategies that learn from labels; then land each tier on its target on the other half along one
knob ``u`` in [0, 1] that all degrading strategies share (each strategy's strength is
``u * max_strength``), by a safeguarded regula-falsi bisection on a split whose unchanging prefix
is cached (:class:`~nnobfuscator.calibration.runner.SplitRunner`); optionally hold what each tier's
user extracts; finally measure every tier on the held-out split (:func:`evaluate`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from nnobfuscator.calibration.extractable import HoldExtractable
from nnobfuscator.calibration.report import build_report
from nnobfuscator.calibration.runner import SplitRunner
from nnobfuscator.calibration.stages import (
    ChooseCompute,
    Finish,
    FitReadouts,
    LandStrengths,
    ResolveTargets,
    Stage,
)
from nnobfuscator.calibration.state import (
    CalibrationError,
    CalibrationOptions,
    CalibrationState,
    halves,
)
from nnobfuscator.core.data import DataLike, as_split
from nnobfuscator.tasks import Task, get_task
from nnobfuscator.tiered.cost import relative_costs, tier_latency_ms
from nnobfuscator.tiered.model import TieredModel

__all__ = ["CalibrationError", "STAGES", "calibrate", "evaluate", "halves"]


class MeasureOnTest(Stage):
    """Measure every tier on the test split (the calibration split when there is none) and
    write the report, with the extractable rows the hold measured."""

    def run(self, state: CalibrationState) -> None:
        report = evaluate(
            state.model,
            state.test if state.test is not None else state.calibration,
            dataset=state.options.dataset,
            batch_size=state.options.batch_size,
            calibration_size=state.task.sample_count(state.calibration.labels),
            base_calibration=state.base,
            calibration_s=state.calibration_s,
            task=state.task,
        )
        if state.options.against == "extractable":
            measured = {row["name"]: row["extractable"] for row in state.extractable["tiers"]}
            for row in report["tiers"]:
                if row["name"] in measured:
                    row["extractable"] = measured[row["name"]]
            extractable = state.extractable["settings"]["extractable"]
            report.setdefault("settings", {})["extractable"] = extractable
        if state.compute_search is not None:
            report.setdefault("settings", {})["compute_curve"] = state.compute_search.curve()
        state.report = report


#: a calibration's stages, in order; each says whether it applies to the calibration at hand
STAGES: tuple[Stage, ...] = (
    ResolveTargets(),
    ChooseCompute(),
    FitReadouts(),
    LandStrengths(),
    HoldExtractable(),
    Finish(),
    MeasureOnTest(),
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
    state = CalibrationState.start(
        model,
        calibration,
        test,
        task,
        CalibrationOptions(
            dataset=dataset,
            batch_size=batch_size,
            max_evals=max_evals,
            headroom=headroom,
            beam=beam,
            progress=progress,
            against=against,
            queries=queries,
            pool=pool,
            build_copy=build_copy,
            recipe=recipe,
            margin=margin,
        ),
    )
    try:
        for stage in STAGES:
            if stage.applies(state):
                stage.run(state)
    finally:
        state.progress.close()
    assert state.report is not None
    return state.report


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
    # correlated samples (tokens of one passage) count for less in the gap's standard error
    share = task.effective_count(full_logits, split.labels) / max(n_test, 1)
    results: dict[str, dict[str, Any]] = {}
    for name, tier in model.tiers.items():
        if not model.is_calibrated(name):
            raise CalibrationError(f"tier {name!r} is not calibrated; run calibrate() first")
        logits = full_logits if tier.is_full else runner.logits(name)
        tier.metrics["test"] = task.score(logits, split.labels)
        results[name] = task.extra(logits, split.labels, full_logits)
        if tier.target_value is not None:
            results[name].update(
                _target_gap(tier.metrics["test"], tier.target_value, n_cal * share, n_test * share)
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


def _target_gap(achieved: float, target: float, n_cal: float, n_test: float) -> dict[str, float]:
    """How far the test metric landed from the target, and two standard errors of that gap.

    The gap's spread comes from sampling both splits: ``sqrt(p (1 - p) (1/n_cal + 1/n_test))``.
    """
    spread = math.sqrt(max(target * (1 - target), 1e-12) * (1 / n_cal + 1 / n_test))
    return {"target_gap": achieved - target, "two_se": 2 * spread}
