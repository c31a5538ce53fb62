"""Calibrating against extractable utility: tiers whose users extract more than their bound
are set stronger, on calibration data, and what each tier's user extracts is reported."""

from __future__ import annotations

from typing import Any

from nnobfuscator.calibration.strength import StrengthCurve, search_knob, set_knob
from nnobfuscator.core.data import Split
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
