"""What a user of each tier extracts with a few labels, on Fashion-MNIST, for every strategy.

The demo resnet18 (Fashion-MNIST), tiers ``free=60%,pro=85%,premium=full`` with
``compute="auto"``, each degrading strategy calibrated alike. Per tier and query budget N: the
face value, decoding its answers with N labels, a knock-off trained on the pool's answers plus N
labels (the owner's recipe), the extractable utility (the best of the three) and what the N
labels give alone (``nnobfuscator.extraction.extract``); the bound is
``max(target, labels-only) + 3`` points. Then the default strategy's tiers under every answer
format, the curve of face value against decodable utility over each strategy's strength (a
plot), and the vote attacks on the default strategy's tiers.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from _common import KEY, QUICK, TIERS, Section, where

from nnobfuscator import calibrate, obfuscate
from nnobfuscator.extraction.augment import AugmentConfig
from nnobfuscator.extraction.extract import CopyRecipe, extract, labels_only
from nnobfuscator.security.attacks import run_attacks
from nnobfuscator.zoo import load_zoo_model
from nnobfuscator.zoo.classifiers import build_model
from nnobfuscator.zoo.fashion import fashion_mnist_splits

HEADING = "## Withholding on Fashion-MNIST: face value vs extractable utility (`make bench`)"
STRATEGIES = ("class-merge", "feature-mix", "weight-noise", "logit-noise", "aim-noise")
DEFAULT = "class-merge"
#: knock-offs (each one a training of the demo architecture) for the default strategy only: for
#: the others the extractable utility shown is a lower bound (the better of face value and decode)
KNOCKOFFS = (DEFAULT,)
#: the other answer formats of the default strategy with knock-offs too (each one a training;
#: none in the measured run: they are decoded only)
FORMAT_KNOCKOFFS: tuple[str, ...] = ()
QUERIES = (300, 1000)
FORMATS = ("top_k:5", "scores", "top1", "label")
MARGIN = 0.03
VOTES = 11
CURVE_POINTS = (0.0, 0.5, 1.0)
PLOT = "withholding.png"


def _setup() -> tuple[Any, dict[str, Any], dict[str, Any]]:
    splits = fashion_mnist_splits()
    if QUICK:  # a smoke test: small splits, numbers mean nothing
        keep = {"pool": 1200}  # the pool holds the largest query budget
        splits = {
            name: type(split)(
                name, split.inputs[: keep.get(name, 600)], split.labels[: keep.get(name, 600)]
            )
            for name, split in splits.items()
        }
    _, info = load_zoo_model("resnet18", progress=True)
    recipe = CopyRecipe.from_training(info["recipe"])
    if QUICK:
        recipe = CopyRecipe(epochs=1, lr=recipe.lr, batch_size=recipe.batch_size)
    return splits, info, {"recipe": recipe}


def _calibrated(strategy: str, splits: dict[str, Any]) -> tuple[Any, dict[str, Any], float]:
    base, _ = load_zoo_model("resnet18", progress=False)
    tiered = obfuscate(base, tiers=TIERS, strategy=strategy, compute="auto", key=KEY)
    started = time.perf_counter()
    report = calibrate(
        tiered, splits["calibration"], splits["test"], dataset="fashion-mnist", progress=False
    )
    return tiered, report, time.perf_counter() - started


def _extracted(
    tiered: Any,
    report: dict[str, Any],
    splits: dict[str, Any],
    fmt: str,
    baseline: dict,
    recipe,
    knockoffs: bool = True,
) -> list[dict[str, Any]]:
    rows = []
    for tier in report["tiers"]:
        if tier["target"] is None:
            continue
        for found in extract(
            tiered,
            tier["name"],
            splits["pool"],
            splits["test"],
            queries=QUERIES,
            answer_format=fmt,
            build_copy=(lambda: build_model("resnet18")) if knockoffs else None,
            recipe=recipe,
            baseline=baseline,
            progress=False,
        ):
            bound = max(tier["target"], found.labels_only) + MARGIN
            rows.append(
                {
                    "tier": tier["name"],
                    "target": tier["target"],
                    "cost": tier["relative_cost"],
                    **found.to_dict(),
                    "face": found.face,
                    "queries": found.queries,
                    "bound": bound,
                    "holds": found.value <= bound,
                }
            )
            print("withholding", tier["name"], fmt, found, flush=True)
    return rows


def _curve(tiered: Any, strategy: str, splits: dict[str, Any], tier: str = "free") -> list[dict]:
    """Face value and decodable utility of ``tier`` over the strategy's strength (its compute
    setting fixed), answers ``top_k:5``."""
    degrading = tiered.degrading[strategy]
    if hasattr(degrading, "fit_tier"):  # class-merge: readouts again for every level
        search = splits["calibration"]
        features = degrading.head_inputs(lambda: _run(tiered, tier, search.inputs, raw=True))
        degrading.fit_tier(tier, features, search.labels)
    points = []
    for share in CURVE_POINTS:
        tiered.set_strength(tier, strategy, share * degrading.max_strength)
        found = extract(
            tiered, tier, splits["pool"], splits["test"], queries=QUERIES, progress=False
        )
        points.append(
            {
                "strength": share,
                "face": found[0].face,
                **{f"decode_{f.queries}": f.decode for f in found},
            }
        )
    return points


def _run(tiered: Any, tier: str, inputs: torch.Tensor, raw: bool = False) -> None:
    strategy = tiered.strategies.get(DEFAULT)
    saved = None
    if raw and strategy is not None:  # the tier's own features: no readout while measuring
        saved = strategy.readouts.pop(tier, None)
    try:
        with torch.no_grad():
            for batch in torch.split(inputs, 256):
                tiered(batch, tier=tier)
    finally:
        if saved is not None:
            strategy.readouts[tier] = saved


def _plot(curves: dict[str, list[dict]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, queries in zip(axes, QUERIES, strict=True):
        for strategy, points in curves.items():
            ax.plot(
                [100 * p["face"] for p in points],
                [100 * p[f"decode_{queries}"] for p in points],
                marker="o",
                label=strategy,
            )
        ax.plot([0, 100], [0, 100], color="#999999", linestyle=":", label="decodes to face value")
        ax.set_xlabel("face value: accuracy of the answers as given (%)")
        ax.set_title(f"free tier, answers top_k:5, decoded with {queries} labels", fontsize=9)
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("accuracy after decoding (%)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Fashion-MNIST resnet18: does lowering a tier withhold or only rename?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run() -> Section:
    from pathlib import Path

    splits, info, options = _setup()
    recipe = options["recipe"]
    baseline = labels_only(
        splits["pool"],
        splits["test"],
        QUERIES,
        build_copy=lambda: build_model("resnet18"),
        recipe=recipe,
        progress=False,
    )
    rows: dict[str, list[dict]] = {}
    curves: dict[str, list[dict]] = {}
    formats: list[dict] = []
    votes: list[dict] = []
    reports: dict[str, dict] = {}
    for strategy in STRATEGIES:
        tiered, report, seconds = _calibrated(strategy, splits)
        reports[strategy] = {"report": report, "seconds": seconds}
        rows[strategy] = _extracted(
            tiered, report, splits, "top_k:5", baseline, recipe, knockoffs=strategy in KNOCKOFFS
        )
        if strategy == DEFAULT:
            for fmt in FORMATS[1:]:
                formats += [
                    {**row, "format": fmt}
                    for row in _extracted(
                        tiered,
                        report,
                        splits,
                        fmt,
                        baseline,
                        recipe,
                        knockoffs=fmt in FORMAT_KNOCKOFFS,
                    )
                ]
            for result in run_attacks(
                tiered,
                splits["test"],
                attacks=["repeat", "augment"],
                tiers=["free", "pro"],
                budget=5 if QUICK else VOTES,
                augment=AugmentConfig(flips=True),
                progress=False,
            ):
                if result.attack.endswith("-vote"):
                    votes.append(result.to_dict())
        curves[strategy] = _curve(tiered, strategy, splits)
    plot = Path(__file__).parent / PLOT
    _plot(curves, plot)
    return _section(rows, formats, curves, votes, reports, baseline, info, recipe)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _section(rows, formats, curves, votes, reports, baseline, info, recipe) -> Section:
    lines = [
        HEADING,
        "",
        f"{where()}. The demo resnet18 trained on Fashion-MNIST ({100 * info['test_accuracy']:.1f}% "
        f'test); tiers `{TIERS}`, `compute="auto"`, each strategy calibrated the same way on the '
        "calibration split (5,000 images) and measured on the test split (5,000). The attacker "
        "holds the pool (10,000 train images the model never saw) with N of them labelled, "
        "queries the tier on the whole pool and sees its answers in the tier's format. "
        "*decode*: a logistic regression from answers to labels, fitted on the N labelled "
        "answers; *knock-off*: resnet18 trained from scratch with the owner's recipe "
        f"({recipe.epochs} epochs over the pool, AdamW {recipe.lr:g}, batch {recipe.batch_size}, "
        "flips) on the pool's answers plus the N true labels; *extractable* is the best of face "
        "value, decode and knock-off; *labels only* the best of a logistic regression on the "
        "pixels and the same resnet18 from scratch on the N labelled images alone "
        f"(N=300: {_pct(baseline[300]['value'])}%, N=1000: {_pct(baseline[1000]['value'])}%). "
        "*bound* = max(target, labels only) + 3 points. Knock-offs are trained for "
        f"{DEFAULT} only (each is a training of the demo architecture): for the other strategies "
        "*extractable* is a lower bound, the better of face value and decode. Accuracy in %.",
        "",
        "### Every strategy, answers `top_k:5` (the server's default for lower tiers)",
        "",
        "| strategy | tier | FLOPs | target | N | face value | decode | knock-off | "
        "**extractable** | labels only | bound | withholds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for strategy, found in rows.items():
        weak = " (weak)" if strategy == "aim-noise" else ""
        for r in found:
            lines.append(
                f"| {strategy}{weak} | {r['tier']} | {r['cost']:.2f} | {_pct(r['target'])} | "
                f"{r['queries']} | {_pct(r['face'])} | {_pct(r['decode'])} | "
                f"{_pct(r.get('knockoff'))} | **{_pct(r['value'])}** | {_pct(r['labels_only'])} | "
                f"{_pct(r['bound'])} | {'yes' if r['holds'] else '**no**'} |"
            )
    lines += [
        "",
        f"### {DEFAULT} under every answer format",
        "",
        "Knock-offs for `top_k:5`"
        + "".join(f" and `{f}`" for f in FORMAT_KNOCKOFFS)
        + "; the other formats are decoded only (knock-off `-`).",
        "",
        "| format | tier | N | face value | decode | knock-off | **extractable** | bound | "
        "withholds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [{**row, "format": "top_k:5"} for row in rows[DEFAULT]] + formats:
        lines.append(
            f"| {r['format']} | {r['tier']} | {r['queries']} | {_pct(r['face'])} | "
            f"{_pct(r['decode'])} | {_pct(r.get('knockoff'))} | **{_pct(r['value'])}** | "
            f"{_pct(r['bound'])} | {'yes' if r['holds'] else '**no**'} |"
        )
    lines += [
        "",
        f"### Voting against {DEFAULT} ({VOTES} queries per test image)",
        "",
        "| tier | attack | single query | voted | gain (points) |",
        "|---|---|---|---|---|",
    ]
    for v in votes:
        lines.append(
            f"| {v['tier']} | {v['attack']} | {_pct(v['single'])} | {_pct(v['attacked'])} | "
            f"{100 * v['gain']:+.1f} |"
        )
    lines += [
        "",
        "### Face value against decodable utility over each strategy's strength",
        "",
        f"The free tier at its compute setting, strength from 0 to the strategy's maximum; "
        f"decode with 300 / 1000 labels, answers `top_k:5`. A strategy that withholds stays on "
        f"the diagonal; one that renames decodes back far above its face value. Plot: "
        f"[`{PLOT}`]({PLOT}).",
        "",
        "| strategy | " + " | ".join(f"s={p:g}" for p in CURVE_POINTS) + " |",
        "|---|" + "---|" * len(CURVE_POINTS),
    ]
    for strategy, points in curves.items():
        cells = [
            f"{_pct(p['face'])} → {_pct(p['decode_300'])} / {_pct(p['decode_1000'])}"
            for p in points
        ]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    default_rows = rows[DEFAULT]
    worst = max(r["value"] - r["bound"] + MARGIN for r in default_rows)
    landed = [t for t in reports[DEFAULT]["report"]["tiers"] if t["target"] is not None]
    summary = [
        (
            f"Face value (test) vs target, Fashion-MNIST resnet18, {DEFAULT}, compute auto",
            ", ".join(
                f"{t['name']} {_pct(t['achieved']['test'])}% (target {_pct(t['target'])}%, "
                f"FLOPs {t['relative_cost']:.2f})"
                for t in landed
            ),
        ),
        (
            f"Extractable utility, Fashion-MNIST resnet18, {DEFAULT} top_k:5 (free / pro, N=300 "
            "/ 1000)",
            ", ".join(
                f"{r['tier']}@{r['queries']} {_pct(r['value'])}% (bound {_pct(r['bound'])})"
                for r in default_rows
            ),
        ),
        (
            "Extractable over max(target, labels only), worst tier (points; bound +3)",
            f"{DEFAULT} {100 * worst:+.1f}; "
            + ", ".join(
                f"{s} {100 * max(r['value'] - r['bound'] + MARGIN for r in rows[s]):+.1f}"
                for s in STRATEGIES
                if s != DEFAULT
            ),
        ),
    ]
    data = {
        "rows": rows,
        "formats": formats,
        "curves": curves,
        "votes": votes,
        "labels_only": baseline,
        "calibration": {
            s: {"seconds": v["seconds"], "tiers": v["report"]["tiers"]} for s, v in reports.items()
        },
    }
    return Section("withholding", "\n".join(lines) + "\n", summary, data)


if __name__ == "__main__":
    print(run().markdown)
