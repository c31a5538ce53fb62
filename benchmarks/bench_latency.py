"""Latency per tier vs the plain (unwrapped) model, for every demo model, at batch 1 and 64."""

from __future__ import annotations

from typing import Any

from _common import (
    DEMO_MODELS,
    TIERS,
    TRAIN_ALL,
    Section,
    batch_of,
    devices,
    fmt_ms,
    interleaved_ms,
    repeats,
    tiered_zoo_model,
    where,
)

HEADING = "## Latency per tier vs the plain model (`make bench`)"
BATCHES = (1, 64)
#: the segmenters train for 13 min together: without BENCH_TRAIN_ALL they must be cached already
_TRAIN_ON_USE = {"resnet18", "vgg16"}


def time_model(name: str, device: str) -> list[dict[str, Any]]:
    """Rows (one per batch size) of median ms for the plain model and every tier."""
    item = tiered_zoo_model(name, train=TRAIN_ALL or name in _TRAIN_ON_USE)
    tiered, plain = item.model.to(device), item.plain.to(device)
    rows = []
    for batch in BATCHES:
        x = batch_of(item.test, batch).to(device)
        runs = {"plain": lambda x=x: plain(x)}
        for tier in tiered.tier_names:
            runs[tier] = lambda x=x, tier=tier: tiered(x, tier=tier)
        count = repeats(30 if batch == 1 else 15) if device == "cpu" else repeats(50)
        medians = interleaved_ms(runs, count, device)
        rows.append(
            {
                "model": name,
                "weights": item.weights,
                "device": device,
                "batch": batch,
                "repeats": count,
                "ms": medians,
                "relative_flops": {t: item.relative_cost(t) for t in tiered.tier_names},
            }
        )
        print("latency", name, device, batch, {k: round(v, 2) for k, v in medians.items()})
    tiered.to("cpu")
    plain.to("cpu")
    return rows


def run() -> Section:
    """Every demo model, calibrated with ``compute="auto"`` and tiers ``free=60%,pro=85%,full``."""
    rows = [row for device in devices() for name in DEMO_MODELS for row in time_model(name, device)]
    lines = [
        HEADING,
        "",
        f"{where()}{' and ' + where('cuda') if 'cuda' in devices() else ''}. Demo models calibrated "
        f'with `compute="auto"` and tiers `{TIERS}` (feature-mix), median ms per batch of '
        "interleaved repeats; each tier's time divided by the plain model's (an unwrapped copy "
        "of the same weights) in the same run. *Relative FLOPs* is the calibration report's cost "
        "of the free tier. Rows marked *untrained* use untrained weights of the same architecture "
        "with fixed strengths and no compute saving (the trained model was not cached; "
        "`BENCH_TRAIN_ALL=1` trains it): they show the wrapper's overhead only.",
        "",
        "| model | weights | device | batch | plain (ms) | free / plain | pro / plain | "
        "premium / plain | free: relative FLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for r in rows:
        ms = r["ms"]
        flops = r["relative_flops"].get("free")
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['device']} | {r['batch']} | "
            f"{fmt_ms(ms['plain'])} | **{ms['free'] / ms['plain']:.3f}** | "
            f"{ms['pro'] / ms['plain']:.3f} | {ms['premium'] / ms['plain']:.3f} | "
            f"{'-' if flops is None else f'{flops:.3f}'} |"
        )
        if r["batch"] == 64 and r["device"] == "cpu":
            summary.append(
                (
                    f"Latency vs plain model, {r['model']} batch 64"
                    + (" (untrained, no compute saving)" if r["weights"] != "trained" else ""),
                    f"free {ms['free'] / ms['plain']:.2f}×, pro {ms['pro'] / ms['plain']:.2f}×, "
                    f"full {ms['premium'] / ms['plain']:.2f}×",
                )
            )
    return Section("latency", "\n".join(lines) + "\n", summary, {"rows": rows})
