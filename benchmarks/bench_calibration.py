"""Calibration: wall time of ``calibrate`` and how close tiers land to their targets, on the demo
resnet18 trained with three seeds, plus a torchvision ResNet-34 at 48 px (time only)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from _common import (
    KEY,
    QUICK,
    TIERS,
    Section,
    Tiered,
    batch_of,
    interleaved_ms,
    repeats,
    tiered_zoo_model,
    where,
)
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision import models

from nnobfuscator import InputSpec, calibrate, obfuscate
from nnobfuscator.core.data import Split
from nnobfuscator.jobs.sources import load_split
from nnobfuscator.zoo import cache_dir

HEADING = "## Calibration time and target error (`make bench`)"
SEEDS = (0,) if QUICK else (0, 1, 2)
RESNET34_SIZE, RESNET34_EPOCHS = 48, 6


def target_errors(report: dict[str, Any]) -> list[dict[str, float]]:
    """|test − target| per calibrated tier, with two standard errors of the gap."""
    rows = []
    for tier in report["tiers"]:
        if tier["target"] is None:
            continue
        extra = tier.get("extra", {})
        rows.append(
            {
                "tier": tier["name"],
                "gap": abs(tier["achieved"]["test"] - tier["target"]),
                "two_se": float(extra.get("two_se", float("nan"))),
            }
        )
    return rows


def summarise(item: Tiered, label: str, wall_ratio: bool = True) -> dict[str, Any]:
    """The row of one calibrated model."""
    assert item.report is not None and item.calibrate_s is not None
    errors = target_errors(item.report)
    row: dict[str, Any] = {
        "model": label,
        "calibrate_s": item.calibrate_s,
        "reported_calibration_s": item.report.get("timings", {}).get("calibration_s"),
        "mean_gap": statistics.mean(e["gap"] for e in errors),
        "within_2se": sum(e["gap"] <= e["two_se"] for e in errors),
        "tiers": len(errors),
        "free_flops": item.relative_cost("free"),
        "free_test": next(t["achieved"]["test"] for t in item.tier_rows() if t["name"] == "free"),
        "base_test": item.report["base"].get("test"),
    }
    if wall_ratio:
        x = batch_of(item.test, 64)
        tiered = item.model
        ms = interleaved_ms(
            {
                "free": lambda: tiered(x, tier="free"),
                "premium": lambda: tiered(x, tier="premium"),
            },
            repeats(20),
        )
        row["free_wall"] = ms["free"] / ms["premium"]
    print("calibration", {k: v for k, v in row.items()})
    return row


def _digits_rgb(split: Split) -> Split:
    """A digits split with its grey channel repeated to 3 (torchvision's stem)."""
    return Split(split.name, split.inputs.expand(-1, 3, -1, -1).contiguous(), split.labels)


def _train(model: nn.Module, split: Split, epochs: int) -> float:
    """A short AdamW run with cross-entropy (seed 0); returns seconds."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * -(-len(split) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(split))
        for begin in range(0, len(split), 64):
            index = order[begin : begin + 64]
            loss = nn.functional.cross_entropy(model(split.inputs[index]), split.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return time.perf_counter() - started


def resnet34() -> dict[str, Any]:
    """torchvision resnet34 (weights=None) trained briefly on digits at 48 px (cached), calibrated
    with ``compute="auto"``."""
    data = {"zoo": "digits", "image_size": RESNET34_SIZE}
    splits = {
        name: _digits_rgb(load_split(data, name)) for name in ("train", "calibration", "test")
    }
    model = models.resnet34(weights=None, num_classes=10)
    path = cache_dir() / f"bench-resnet34-digits{RESNET34_SIZE}-e{RESNET34_EPOCHS}.safetensors"
    train_s = None
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        model.eval()
    else:
        print(
            f"training resnet34 at {RESNET34_SIZE} px for {RESNET34_EPOCHS} epochs (once; cached)"
        )
        train_s = _train(model, splits["train"], RESNET34_EPOCHS)
        print(f"trained resnet34 in {train_s:.0f} s")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    plain = models.resnet34(weights=None, num_classes=10)
    plain.load_state_dict(model.state_dict())
    tiered = obfuscate(
        model,
        tiers=TIERS,
        compute="auto",
        key=KEY,
        input_spec=InputSpec(3, RESNET34_SIZE, RESNET34_SIZE),
        model_name="resnet34",
    )
    started = time.perf_counter()
    report = calibrate(tiered, splits["calibration"], splits["test"], progress=not QUICK)
    item = Tiered(
        "resnet34",
        tiered,
        plain.eval(),
        "trained",
        splits["calibration"],
        splits["test"],
        report,
        time.perf_counter() - started,
    )
    row = summarise(item, f"torchvision resnet34, {RESNET34_SIZE} px", wall_ratio=False)
    row["train_s"] = train_s
    return row


def run() -> Section:
    """Three seeds of the demo resnet18 (compute auto), then resnet34 at 48 px."""
    rows = []
    for seed in SEEDS:
        item = tiered_zoo_model("resnet18", seed=seed)
        rows.append(summarise(item, f"demo resnet18, seed {seed}"))
    r34 = resnet34()
    lines = [
        HEADING,
        "",
        f'{where()}. Tiers `{TIERS}`, feature-mix, `compute="auto"`; *calibrate (s)* is the '
        "wall time of `calibrate()` (compute search, bisection and the test-split evaluation). "
        "*|test − target|* is the mean over the calibrated tiers, in points, with how many "
        "tiers landed within two standard errors. The demo resnet18 differs between seeds by "
        "its initial weights (same data, same order). Free tier: test accuracy, relative FLOPs "
        "(calibration report) and wall time relative to the full tier at batch 64 "
        f"(median of {repeats(20)} interleaved repeats). The ResNet-34 is torchvision's "
        f"(weights=None, 3-channel stem; digits at {RESNET34_SIZE} px, grey repeated) trained "
        f"briefly here ({RESNET34_EPOCHS} epochs, one-cycle AdamW; cached): it times "
        "calibration on a user's larger model.",
        "",
        "| model | full model test | calibrate (s) | mean \\|test − target\\| | within 2 SE | "
        "free: test | free: relative FLOPs | free: wall / full (batch 64) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in [*rows, r34]:
        wall = f"{r['free_wall']:.3f}" if "free_wall" in r else "-"
        lines.append(
            f"| {r['model']} | {100 * r['base_test']:.1f}% | {r['calibrate_s']:.1f} | "
            f"{100 * r['mean_gap']:.1f} | {r['within_2se']}/{r['tiers']} | "
            f"{100 * r['free_test']:.1f}% | {r['free_flops']:.3f} | {wall} |"
        )
    summary = [
        (
            f"Calibration with compute saving, demo resnet18 (seeds {', '.join(map(str, SEEDS))})",
            ", ".join(f"{r['calibrate_s']:.0f} s" for r in rows)
            + "; mean distance of test accuracy to target "
            + ", ".join(f"{100 * r['mean_gap']:.1f}" for r in rows)
            + " points",
        ),
        (
            "Free tier, demo resnet18: relative FLOPs / wall time vs full (batch 64), per seed",
            ", ".join(f"{r['free_flops']:.2f} / {r['free_wall']:.2f}" for r in rows),
        ),
        (
            f"Calibration with compute saving, torchvision resnet34 at {RESNET34_SIZE} px",
            f"{r34['calibrate_s']:.0f} s",
        ),
    ]
    return Section("calibration", "\n".join(lines) + "\n", summary, {"rows": [*rows, r34]})
