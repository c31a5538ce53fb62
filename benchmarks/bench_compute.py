"""Wall time per batch of compute-saving tiers vs the full model, measured as ratios in one run.

Run: ``python benchmarks/bench_compute.py`` (``make bench`` runs it too). Calibrates the demo
ResNet-18 on digits (cached zoo model; trained on first use) with ``compute="auto"`` and tiers
``free=60%,pro=85%,premium=full``, then times each tier's forward at several batch sizes,
interleaving repeats so drifts in machine load hit every tier alike. Updates its own section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import platform
import statistics
import time
from datetime import date

import torch
from _results import update_section

from nnobfuscator import InputSpec, calibrate, obfuscate
from nnobfuscator.sources import load_base_model, load_split

REPEATS = 30
BATCHES = (1, 64, 256)
TIERS = "free=60%,pro=85%,premium=full"


@torch.inference_mode()
def main() -> None:
    base, _ = load_base_model({"zoo": "resnet18"}, progress=True)
    data = {"zoo": "digits", "image_size": 16}
    calibration, test = load_split(data, "calibration"), load_split(data, "test")
    tiered = obfuscate(
        base,
        tiers=TIERS,
        compute="auto",
        key=b"b" * 32,
        input_spec=InputSpec(1, 16, 16),
        model_name="resnet18",
    )
    report = calibrate(tiered, calibration, test, dataset="digits", progress=True)
    tiers = {t["name"]: t for t in report["tiers"]}
    rows = []
    for batch in BATCHES:
        x = test.images[:batch]
        mixed = [("free", "pro", "premium")[i % 3] for i in range(batch)]
        runs = {name: (lambda name=name, x=x: tiered(x, tier=name)) for name in tiers}
        if batch >= 3:
            runs["mixed"] = lambda x=x, mixed=mixed: tiered(x, tiers=mixed)
        for fn in runs.values():
            fn()
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(REPEATS):
            for name, fn in runs.items():
                started = time.perf_counter()
                fn()
                samples[name].append(1000 * (time.perf_counter() - started))
        medians = {name: statistics.median(values) for name, values in samples.items()}
        rows.append((batch, medians))
        print(batch, {k: round(v, 2) for k, v in medians.items()}, flush=True)
    lines = [
        "## Compute-saving tiers: wall time per batch vs the full model (`benchmarks/bench_compute.py`)",
        "",
        f"Measured {date.today()} on {platform.machine()} CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; demo resnet18 on digits (1x16x16), tiers `{TIERS}`, "
        '`compute="auto"`, median of '
        f"{REPEATS} interleaved repeats. Ratios are tier time / full-tier time in the same run. "
        "*mixed* is one batch with a third of the samples at each tier (one pass per tier group).",
        "",
        "| tier | test accuracy | relative FLOPs | compute setting |",
        "|---|---|---|---|",
    ]
    for name, tier in tiers.items():
        setting = {
            name: value
            for name, value in tier["params"].items()
            if name in tiered.compute and value != tiered.compute[name].default_setting()
        }
        lines.append(
            f"| {name} | {100 * tier['achieved']['test']:.1f}% | {tier['relative_cost']:.3f} | "
            f"`{setting or 'full model'}` |"
        )
    lines += [
        "",
        "| batch | full (ms) | free (ms) | free / full | pro (ms) | pro / full | mixed / full |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, m in rows:
        full = m["premium"]
        mixed = f"{m['mixed'] / full:.3f}" if "mixed" in m else "-"
        lines.append(
            f"| {batch} | {full:.2f} | {m['free']:.2f} | **{m['free'] / full:.3f}** | "
            f"{m['pro']:.2f} | {m['pro'] / full:.3f} | {mixed} |"
        )
    section = "\n".join(lines) + "\n"
    update_section(section)
    print(section)


if __name__ == "__main__":
    main()
