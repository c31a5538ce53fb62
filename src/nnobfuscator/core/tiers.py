"""Tier specifications: a name, a target utility, an optional cost budget, calibrated results.

Tiers are data. A plan is an ordered list of tiers, lowest utility first; the ``full`` target means
the untouched model, bit-exact.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from nnobfuscator.core.answers import AnswerFormat, default_format

TargetKind = Literal["absolute", "relative", "full"]
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Target:
    """What utility a tier aims for.

    Args:
        kind: ``"absolute"`` (a metric value such as ``0.6``), ``"relative"`` (a fraction of the full
            model's metric, written ``60%``) or ``"full"`` (the untouched model).
        value: the fraction (``0.6`` for both ``0.6`` and ``60%``); ``None`` for ``full``.
        spec: the target as the user wrote it.
    """

    kind: TargetKind
    value: float | None
    spec: str

    @classmethod
    def parse(cls, spec: str | float | int) -> Target:
        """Parse ``0.6``, ``"0.6"``, ``"60%"`` or ``"full"``.

        Raises:
            ValueError: the spec is not one of those forms or lies outside (0, 1].
        """
        text = str(spec).strip().lower()
        if text in {"full", "100%"}:
            return cls("full", None, "full")
        try:
            if text.endswith("%"):
                kind: TargetKind = "relative"
                value = float(text[:-1]) / 100.0
            else:
                kind = "absolute"
                value = float(text)
        except ValueError:
            raise ValueError(
                f"bad tier target {spec!r}: write a metric value like 0.6, a share of the full "
                "model like 60%, or 'full'"
            ) from None
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"bad tier target {spec!r}: it must lie in (0, 1] (or (0%, 100%]); "
                "metrics are fractions, e.g. accuracy 0.6"
            )
        return cls(kind, value, str(spec).strip())

    def resolve(self, base_metric: float) -> float | None:
        """The metric value this target asks for, given the full model's metric."""
        if self.kind == "full":
            return None
        assert self.value is not None
        return self.value * base_metric if self.kind == "relative" else self.value


@dataclass
class Tier:
    """One quality level.

    Args:
        name: identifier used in requests (``model(x, tier="free")``) and keys.
        target: the utility to calibrate to.
        max_cost: optional budget, FLOPs relative to the full model.
        params: calibrated parameters per strategy, e.g. ``{"feature-mix": {"strength": 0.7}}``.
        metrics: what the tier achieved, e.g. ``{"calibration": 0.61, "test": 0.60}``.
        answer_format: what a user of the tier receives from a classifier (``scores``,
            ``top_k:N``, ``top1``, ``label``; see :class:`~nnobfuscator.core.answers.AnswerFormat`);
            ``None``: ``top_k:5`` below the full tier, ``scores`` at it.
    """

    name: str
    target: Target
    max_cost: float | None = None
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    target_value: float | None = None
    relative_cost: float = 1.0
    answer_format: str | None = None

    def __post_init__(self) -> None:
        if self.answer_format is not None:
            self.answer_format = AnswerFormat.parse(self.answer_format).spec
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"bad tier name {self.name!r}: use a letter followed by letters, digits, '-' or '_'"
            )
        if self.max_cost is not None and not 0.0 < self.max_cost <= 1.0:
            raise ValueError(
                f"tier {self.name!r}: max_cost must lie in (0, 1], got {self.max_cost}"
            )

    @property
    def is_full(self) -> bool:
        return self.target.kind == "full"

    @property
    def format(self) -> AnswerFormat:
        """The tier's answer format (its own, or the default for its place)."""
        return AnswerFormat.parse(self.answer_format or default_format(self.is_full))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = self.target.spec
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tier:
        return cls(
            name=data["name"],
            target=Target.parse(data["target"]),
            max_cost=data.get("max_cost"),
            params={k: dict(v) for k, v in data.get("params", {}).items()},
            metrics=dict(data.get("metrics", {})),
            target_value=data.get("target_value"),
            relative_cost=float(data.get("relative_cost", 1.0)),
            answer_format=data.get("answer_format"),
        )


def parse_tiers(spec: str | list[Any] | dict[str, Any]) -> list[Tier]:
    """Build an ordered tier list from ``"free=60%,pro=85%,premium=full"``, a list or a mapping.

    List items may be ``"name=target"`` strings or ``{"name": ..., "target": ..., "max_cost": ...,
    "answer_format": ...}``. A string item may carry a cost budget after ``@``: ``"free=60%@0.5"``
    (at most half the FLOPs), and an answer format after ``:``: ``"free=60%:label"``,
    ``"pro=85%@0.6:top_k:3"``.
    The result is sorted from lowest to highest target (``full`` last).

    Raises:
        ValueError: empty plan, duplicate names, malformed items or two ``full`` tiers.
    """
    items: list[Any]
    if isinstance(spec, str):
        items = [part for part in (p.strip() for p in spec.split(",")) if part]
    elif isinstance(spec, dict):
        items = [{"name": k, "target": v} for k, v in spec.items()]
    else:
        items = list(spec)
    tiers: list[Tier] = []
    for item in items:
        if isinstance(item, str):
            name, sep, target = item.partition("=")
            if not sep:
                raise ValueError(f"bad tier {item!r}: write it as name=target, e.g. free=60%")
            target, _, answer_format = target.partition(":")
            target, _, budget = target.partition("@")
            tiers.append(
                Tier(
                    name.strip(),
                    Target.parse(target),
                    _parse_budget(item, budget),
                    answer_format=answer_format.strip() or None,
                )
            )
        elif isinstance(item, dict) and "name" in item and "target" in item:
            tiers.append(
                Tier(
                    str(item["name"]),
                    Target.parse(item["target"]),
                    item.get("max_cost"),
                    answer_format=item.get("answer_format"),
                )
            )
        else:
            raise ValueError(f"bad tier {item!r}: give 'name=target' or {{name:, target:}}")
    if not tiers:
        raise ValueError("no tiers given: e.g. --tiers 'free=60%,pro=85%,premium=full'")
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tier names in {names}")
    if sum(t.is_full for t in tiers) > 1:
        raise ValueError("only one tier can be 'full' (the untouched model)")
    kinds = {t.target.kind for t in tiers if not t.is_full}
    if len(kinds) > 1:
        raise ValueError("mix of absolute (0.6) and relative (60%) targets: use one kind per plan")
    return sorted(tiers, key=lambda t: (t.is_full, t.target.value or 0.0))


def _parse_budget(item: str, budget: str) -> float | None:
    if not budget.strip():
        return None
    try:
        return float(budget)
    except ValueError:
        raise ValueError(
            f"bad cost budget in {item!r}: write name=target@max_cost, e.g. free=60%@0.5"
        ) from None
