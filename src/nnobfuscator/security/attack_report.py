"""The attack report: JSON, a table and a plot of what each attack recovered per tier."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnobfuscator.extraction.oracle import AttackResult
from nnobfuscator.version import __version__

if TYPE_CHECKING:
    from nnobfuscator.tiered.model import TieredModel

#: results whose budget is a number of labelled or unlabelled queries, not copies per input
QUERY_ATTACKS = ("distill", "decode-scores", "decode-label", "extract")
ATTACK_COLUMNS = [
    "attack",
    "tier",
    "budget",
    "target",
    "single-query",
    "attacked",
    "gain",
    "full",
    "true labels",
]


def build_attack_report(
    model: TieredModel,
    results: Sequence[AttackResult],
    *,
    metric: str,
    settings: dict[str, Any],
    splits: dict[str, int],
    seconds: float | None = None,
) -> dict[str, Any]:
    """Assemble the JSON report of an attack run (metric values are fractions in [0, 1])."""
    tiers = sorted({r.tier for r in results}, key=model.tier_names.index)
    report: dict[str, Any] = {
        "version": __version__,
        "model": model.model_name,
        "task": model.task,
        "dataset": model.meta.get("dataset", "custom"),
        "metric": metric,
        "strategies": {tier: model.tier_strategy(tier) for tier in tiers},
        "weak_strategies": sorted(n for n, s in model.strategies.items() if s.weak),
        "settings": settings,
        "splits": splits,
        "results": [r.to_dict() for r in results],
    }
    if seconds is not None:
        report["seconds"] = round(seconds, 1)
    return report


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def attack_rows(report: dict[str, Any]) -> list[list[str]]:
    """The report's results as strings, one row per result (columns: ``ATTACK_COLUMNS``)."""
    return [
        [
            row["attack"],
            row["tier"],
            str(row["budget"]),
            "full" if row["target"] is None else _percent(row["target"]),
            _percent(row["single"]),
            _percent(row["attacked"]),
            f"{round(100 * row['gain'], 1) + 0.0:+.1f}",  # no "-0.0"
            _percent(row["full"]),
            _percent(row.get("reference")),
        ]
        for row in report["results"]
    ]


EXTRACT_COLUMNS = [
    "tier",
    "format",
    "labels",
    "target",
    "face value",
    "decode",
    "knock-off",
    "extractable",
    "labels only",
    "bound (+3)",
]


def extract_rows(report: dict[str, Any], margin: float = 0.03) -> list[list[str]]:
    """The ``extract`` results as strings (columns: ``EXTRACT_COLUMNS``); the bound is
    ``max(target, labels only) + margin``."""
    rows = []
    for row in report["results"]:
        if row["attack"] != "extract":
            continue
        details = row["details"]
        bound = max(row["target"] or 0.0, row["reference"] or 0.0) + margin
        held = "" if row["target"] is None else (" ok" if row["attacked"] <= bound else " OVER")
        rows.append(
            [
                row["tier"],
                details["answer_format"],
                str(row["budget"]),
                "full" if row["target"] is None else _percent(row["target"]),
                _percent(details["face"]),
                _percent(details["decode"]),
                _percent(details.get("knockoff")),
                _percent(row["attacked"]),
                _percent(row["reference"]),
                _percent(bound) + held,
            ]
        )
    return rows


def plot_attacks(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG per attacked tier: what each attack reached, against the tier's single-query
    utility, its target and the full model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnobfuscator.tasks.figures import save_figure

    tiers = list(dict.fromkeys(row["tier"] for row in report["results"]))
    fig, axes = plt.subplots(
        1, len(tiers), figsize=(max(5.0, 1.0 + 0.55 * _most_rows(report, tiers)) * len(tiers), 4.2)
    )
    axes = [axes] if len(tiers) == 1 else list(axes)
    for ax, tier in zip(axes, tiers, strict=True):
        rows = [row for row in report["results"] if row["tier"] == tier]
        labels = [
            f"{row['attack']} ({row['budget']})"
            if row["attack"] in QUERY_ATTACKS
            else row["attack"]
            for row in rows
        ]
        positions = range(len(rows))
        bars = ax.bar(positions, [100 * row["attacked"] for row in rows], color="#3182bd")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        references = [(p, row["reference"]) for p, row in enumerate(rows) if row["reference"]]
        if references:
            ax.scatter(
                [p for p, _ in references],
                [100 * value for _, value in references],
                marker="x",
                color="black",
                zorder=3,
                label="same copy, true labels",
            )
        first = rows[0]
        ax.axhline(100 * first["single"], color="#636363", linestyle="--", label="single query")
        ax.axhline(100 * first["full"], color="#31a354", linestyle=":", label="full model")
        if first["target"] is not None:
            ax.axhline(100 * first["target"], color="#d62728", linestyle="-.", label="target")
        ax.set_xticks(list(positions), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 105)
        ax.set_ylabel(f"{report['metric']} (%)")
        ax.set_title(f"tier {tier} ({report['strategies'].get(tier, '?')})", fontsize=9)
        ax.legend(loc="lower left", fontsize=7)
    fig.suptitle(f"{report['model']} on {report['dataset']}: attacks on served tiers", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _most_rows(report: dict[str, Any], tiers: list[str]) -> int:
    return max(sum(row["tier"] == tier for row in report["results"]) for tier in tiers)
