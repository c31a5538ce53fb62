"""The tier report (``report.schema.json``): building, writing, a table and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnobfuscator.tasks.figures import save_figure
from nnobfuscator.version import __version__

if TYPE_CHECKING:
    from nnobfuscator.tasks import Task
    from nnobfuscator.tiered.model import TieredModel


def build_report(
    model: TieredModel,
    task: Task,
    *,
    extra: dict[str, dict[str, Any]] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Assemble the report of a calibrated and evaluated tiered model."""
    meta = model.meta
    tiers = []
    for tier in model.tiers.values():
        row: dict[str, Any] = {
            "name": tier.name,
            "target": tier.target_value,
            "target_spec": tier.target.spec,
            "strategy": model.tier_strategy(tier.name),
            "params": {} if tier.is_full else tier.params,
            "achieved": {
                "calibration": _clip(tier.metrics.get("calibration", 0.0)),
                "test": _clip(tier.metrics.get("test", 0.0)),
            },
            "relative_cost": max(tier.relative_cost, 1e-9),
        }
        if tier.max_cost is not None:
            row["max_cost"] = tier.max_cost
        if task.name == "classification":
            row["answer_format"] = tier.format.spec
        if extra and tier.name in extra:
            row["extra"] = extra[tier.name]
        tiers.append(row)
    report: dict[str, Any] = {
        "version": __version__,
        "task": task.name,
        "model": model.model_name,
        "dataset": meta.get("dataset", "custom"),
        "metric": task.metric,
        "splits": dict(meta.get("splits", {})),
        "base": {k: _clip(v) for k, v in meta.get("base", {}).items()},
        "tiers": tiers,
    }
    if timings:
        report["timings"] = timings
    return report


def _clip(value: float) -> float:
    return min(max(float(value), 0.0), 1.0)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as sorted, indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return path


def report_columns(report: dict[str, Any]) -> list[str]:
    """``REPORT_COLUMNS``, plus the answer format and one column per measured label budget of
    the extractable utility when the report has them."""
    columns = list(REPORT_COLUMNS)
    if any("answer_format" in tier for tier in report["tiers"]):
        columns.insert(columns.index("strategy"), "answer")
    return columns + [f"extractable@{n} (labels only)" for n in _budgets(report)]


def _budgets(report: dict[str, Any]) -> list[str]:
    found = {n for tier in report["tiers"] for n in tier.get("extractable", {})}
    return sorted(found, key=int)


def report_rows(report: dict[str, Any]) -> list[list[str]]:
    """The tier table as strings, one row per tier (columns: :func:`report_columns`)."""
    rows = []
    formats = any("answer_format" in tier for tier in report["tiers"])
    budgets = _budgets(report)
    for tier in report["tiers"]:
        target = "full" if tier["target"] is None else f"{100 * tier['target']:.1f}%"
        spec = tier.get("target_spec", "")
        if spec and spec != "full":
            target += f" ({spec})"
        row = [
            tier["name"],
            target,
            f"{100 * tier['achieved']['calibration']:.1f}%",
            f"{100 * tier['achieved']['test']:.1f}%",
            _gap(tier),
            *([tier.get("answer_format", "-")] if formats else []),
            tier["strategy"],
            f"{tier['relative_cost']:.3f}",
            _latency(tier),
        ]
        for budget in budgets:
            found = tier.get("extractable", {}).get(budget)
            row.append(
                "-"
                if found is None
                else f"{100 * found['value']:.1f}% ({100 * found['labels_only']:.1f}%)"
            )
        rows.append(row)
    return rows


REPORT_COLUMNS = [
    "tier",
    "target",
    "calibration",
    "test",
    "test - target (2 SE)",
    "strategy",
    "relative cost",
    "latency / batch",
]


def _latency(tier: dict[str, Any]) -> str:
    latency = tier.get("extra", {}).get("latency_ms")
    return "-" if latency is None else f"{latency:.1f} ms"


def _gap(tier: dict[str, Any]) -> str:
    extra = tier.get("extra", {})
    if "target_gap" not in extra:
        return "-"
    return f"{100 * extra['target_gap']:+.1f} (±{100 * extra['two_se']:.1f})"


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG of utility per tier: achieved (calibration, test) against target, and cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = report["tiers"]
    names = [t["name"] for t in tiers]
    positions = range(len(tiers))
    fig, (ax, ax_cost) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.38
    cal = [100 * t["achieved"]["calibration"] for t in tiers]
    test = [100 * t["achieved"]["test"] for t in tiers]
    ax.bar([p - width / 2 for p in positions], cal, width, label="calibration", color="#9ecae1")
    bars = ax.bar([p + width / 2 for p in positions], test, width, label="test", color="#3182bd")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    for p, tier in zip(positions, tiers, strict=True):
        target = 100 * (
            tier["target"] if tier["target"] is not None else report["base"]["calibration"]
        )
        ax.hlines(
            target,
            p - 0.45,
            p + 0.45,
            colors="#d62728",
            linestyles="--",
            label="target" if p == 0 else None,
        )
    markers = {"300": "^", "1000": "v"}
    for p, tier in zip(positions, tiers, strict=True):
        for budget, row in sorted(tier.get("extractable", {}).items(), key=lambda i: int(i[0])):
            ax.scatter(
                [p + width / 2],
                [100 * row["value"]],
                marker=markers.get(budget, "o"),
                color="black",
                zorder=3,
                label=f"extractable with {budget} labels" if p == 0 else None,
            )
    ax.set_xticks(list(positions), names)
    ax.set_ylabel(f"{report['metric']} (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{report['model']} on {report['dataset']}: utility per tier")
    ax.legend(loc="lower right", fontsize=8)
    costs = [t["relative_cost"] for t in tiers]
    ax_cost.plot(costs, test, "o-", color="#3182bd")
    for name, c, m in zip(names, costs, test, strict=True):
        ax_cost.annotate(name, (c, m), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax_cost.set_xlabel("relative cost (FLOPs vs full model)")
    ax_cost.set_ylabel(f"test {report['metric']} (%)")
    ax_cost.set_xlim(0, 1.1)
    ax_cost.set_ylim(0, 105)
    ax_cost.set_title("utility vs cost")
    ax_cost.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
