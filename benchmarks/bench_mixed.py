"""Mixed-tier vs single-tier throughput: one batch with a third of the samples at each tier vs the
same-size batch at one tier."""

from __future__ import annotations

import statistics
from typing import Any

from _common import (
    TIERS,
    Section,
    batch_of,
    devices,
    fmt_ms,
    interleaved_ms,
    mixed_tiers,
    repeats,
    tiered_zoo_model,
    where,
)

HEADING = "## Mixed-tier vs single-tier batches (`make bench`)"
BATCH = 64


def time_mixed(compute: str | None, device: str) -> dict[str, Any]:
    """Median ms of a mixed batch and of each single-tier batch, interleaved."""
    item = tiered_zoo_model("resnet18", compute=compute)
    tiered = item.model.to(device)
    x = batch_of(item.test, BATCH).to(device)
    mixed = mixed_tiers(tiered, BATCH)
    runs = {tier: (lambda tier=tier: tiered(x, tier=tier)) for tier in tiered.tier_names}
    runs["mixed"] = lambda: tiered(x, tiers=mixed)
    ms = interleaved_ms(runs, repeats(30 if device == "cpu" else 50), device)
    tiered.to("cpu")
    single = statistics.mean(ms[t] for t in tiered.tier_names)
    full = ms[tiered.tier_names[-1]]
    print("mixed", compute, device, {k: round(v, 2) for k, v in ms.items()})
    return {
        "compute": compute or "none",
        "device": device,
        "ms": ms,
        "single_mean": single,
        "vs_single": ms["mixed"] / single,
        "vs_full": ms["mixed"] / full,
        "throughput_vs_single": single / ms["mixed"],
    }


def run() -> Section:
    """resnet18 at batch 64, with and without compute saving."""
    rows = [time_mixed(compute, device) for device in devices() for compute in ("auto", None)]
    lines = [
        HEADING,
        "",
        f"{where()}{' and ' + where('cuda') if 'cuda' in devices() else ''}. Demo resnet18, tiers "
        f"`{TIERS}` calibrated with and without compute saving; batch {BATCH}; *mixed* has a "
        "third of the samples at each tier (interleaved), single-tier batches the same 64 "
        "samples at one tier. Median ms of interleaved repeats. *mixed / mean single* is the "
        "mixed batch's time over the mean of the three single-tier times (below 1.00: a mixed "
        "batch costs no more than the tiers it mixes); *throughput* is its inverse.",
        "",
        "| compute saving | device | free (ms) | pro (ms) | premium (ms) | mixed (ms) | "
        "**mixed / mean single** | mixed / full | throughput vs single |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['compute']} | {r['device']} | {fmt_ms(ms['free'])} | {fmt_ms(ms['pro'])} | "
            f"{fmt_ms(ms['premium'])} | {fmt_ms(ms['mixed'])} | **{r['vs_single']:.3f}** | "
            f"{r['vs_full']:.3f} | {r['throughput_vs_single']:.3f} |"
        )
    summary = [
        (
            "Mixed batch (a third at each tier) throughput vs single-tier, resnet18 batch 64"
            + (", compute saving" if r["compute"] != "none" else ", no compute saving"),
            f"{r['throughput_vs_single']:.2f}× (time {r['vs_full']:.2f}× the full tier's)",
        )
        for r in rows
        if r["device"] == "cpu"
    ]
    return Section("mixed", "\n".join(lines) + "\n", summary, {"rows": rows})
