"""Calibrating against extractable utility: tiers whose users extract more than their bound
are set stronger, on calibration data, and what each tier's user extracts is reported."""

from __future__ import annotations

from typing import Any

from nnobfuscator.calibration.stages import Stage
from nnobfuscator.calibration.state import CalibrationError, CalibrationState
from nnobfuscator.calibration.strength import StrengthCurve, search_knob, set_knob
from nnobfuscator.core.data import Split, as_split
from nnobfuscator.tiered.model import TieredModel

#: rounds of setting tiers stronger when their users extract more than their bound
TIGHTENINGS = 3


def hold_extractable(
    model: TieredModel,
    rows: dict[str, Any],
    curve: StrengthCurve,
    knobs: dict[str, float],
    *,
    check: Split,
    test: Split | None,
    tolerance: float,
    max_evals: int,
    **attack: Any,
) -> list[Any]:
    """Set tiers whose users extract more than their bound stronger, then write what each
    tier's user extracts on ``test`` into ``rows``
    (:func:`~nnobfuscator.extraction.extract.add_extractable`).

    Decisions read ``check`` (calibration data, never the test split): a tier over its bound
    aims its calibration metric that much lower, up to ``TIGHTENINGS`` times, but never more
    than ``margin`` below its target (a tier that only renames what the model knows would
    otherwise fall far below it).

    Returns:
        The overruns left on ``check``: tiers that stay over their bound.
    """
    from nnobfuscator.extraction.extract import CopyRecipe, add_extractable, labels_only

    attack["recipe"] = attack.get("recipe") or CopyRecipe()
    pool = attack.pop("pool")

    baselines: dict[int, dict] = {}  # labels-only per split, measured once (copies train)

    def measure(split: Split, names: list[str] | None = None) -> list[Any]:
        if id(split) not in baselines:
            baselines[id(split)] = labels_only(
                pool,
                split,
                attack["queries"],
                build_copy=attack["build_copy"],
                recipe=attack["recipe"],
                progress=attack["progress"],
            )
        baseline = baselines[id(split)]
        return add_extractable(model, rows, pool, split, baseline=baseline, tiers=names, **attack)

    overruns = measure(check)
    for _ in range(TIGHTENINGS):
        excess: dict[str, float] = {}
        for over in overruns:
            excess[over.tier] = max(excess.get(over.tier, 0.0), over.excess)
        moved = []
        for name, amount in excess.items():
            tier = model.tiers[name]
            floor = (tier.target_value or 0.0) - attack["margin"]
            aim = max(tier.metrics["calibration"] - amount - tolerance, floor)
            knob = search_knob(curve, name, aim, tolerance, max_evals)
            if knob <= knobs[name]:
                continue  # as strong as its target allows, or its metric no longer falls
            knobs[name] = knob
            set_knob(model, name, knob)
            tier.metrics["calibration"] = curve.points(name)[knob]
            moved.append(name)
        if not moved:
            break
        overruns = [over for over in overruns if over.tier not in moved] + measure(check, moved)
    if test is not None and test is not check:
        measure(test)
    return overruns


class HoldExtractable(Stage):
    """With ``against="extractable"``: measure what each tier's user extracts, set tiers over
    their bound stronger (:func:`hold_extractable`) and refuse a calibration that leaves one over
    it on calibration data."""

    def applies(self, state: CalibrationState) -> bool:
        return state.options.against == "extractable"

    def run(self, state: CalibrationState) -> None:
        options = state.options
        state.extractable = {"tiers": [{"name": t.name} for t in state.tiers]}
        overruns = hold_extractable(
            state.model,
            state.extractable,
            state.curve,
            state.knobs,
            tolerance=state.tolerance,
            max_evals=options.max_evals,
            pool=as_split(options.pool, "pool") if options.pool is not None else state.search,
            check=state.land,
            test=state.test,
            queries=options.queries,
            build_copy=options.build_copy,
            recipe=options.recipe,
            margin=options.margin,
            progress=options.progress,
        )
        if overruns:
            raise CalibrationError(
                "their users extract more than the tiers show, on calibration data and with each "
                f"tier set up to {100 * options.margin:.0f} points below its target: "
                + "; ".join(map(str, overruns))
                + ". Use a strategy that withholds (class-merge, the default for classifiers) "
                "or answer less (answer_format top1 or label)"
            )
