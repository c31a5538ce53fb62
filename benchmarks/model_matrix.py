"""Which torchvision families nnobfuscator handles, and how: attach with default settings, check
the invariants, list the compute strategies that apply and what the cheapest setting saves.

Run: ``python benchmarks/model_matrix.py`` (random weights, no download; a few minutes on 2 cores).
Writes the "Any model" section of ``benchmarks/RESULTS.md`` and prints it.
"""

from __future__ import annotations

import platform
import sys
import time

import torch
from _results import update_section

from nnobfuscator import obfuscate, read_output
from nnobfuscator.tiered.cost import tier_flops
from nnobfuscator.zoo.families import Family, all_families


@torch.inference_mode()
def examine(family: Family) -> list[str]:
    """One table row: builder, params, layers, invariants, compute strategies, cheapest FLOPs."""
    x = family.example(4)
    reference = family.build()
    expected = read_output(reference(x))
    tiered = obfuscate(
        family.build(),
        tiers="free=0.5,premium=full",
        compute="auto",
        key=b"m" * 32,
        task=family.task,
    )
    layers = len(tiered.strategies["feature-mix"].layers)
    tiered.set_strength("free", "feature-mix", 0.5)
    for name, strategy in tiered.compute.items():
        tiered.set_setting("free", name, strategy.default_setting())
    exact = torch.equal(read_output(tiered(x, tier="premium")), expected)
    mixed = read_output(tiered(x, tiers=["free", "premium", "free", "premium"]))
    free = read_output(tiered(x[[0, 2]], tier="free"))
    invariants = (
        exact
        and torch.allclose(mixed[[0, 2]], free, atol=1e-4)
        and torch.allclose(mixed[[1, 3]], expected[[1, 3]], atol=1e-4)
    )
    applies = []
    for name, strategy in tiered.compute.items():
        if name == "input-resolution":
            tiered.set_setting("free", name, {"scale": 0.75})
            try:
                tiered(x, tier="free")
                applies.append("input-resolution")
            except (RuntimeError, ValueError, AssertionError):
                pass
            tiered.set_setting("free", name, strategy.default_setting())
            continue
        applies.append(f"{name} ({len(strategy.layers)})")
        cheapest = strategy.default_setting()
        while strategy.cheaper(cheapest):
            cheapest = strategy.cheaper(cheapest)[-1]
        tiered.set_setting("free", name, cheapest)
    full = tier_flops(tiered, x[:1], None)
    ratio = tier_flops(tiered, x[:1], "free") / full
    return [
        family.family,
        family.builder,
        f"{family.params / 1e6:.1f}M",
        f"{family.input_size}px",
        str(layers),
        "yes" if invariants else "NO",
        ", ".join(applies) or "none",
        f"{ratio:.2f}",
    ]


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    header = [
        "family",
        "smallest builder",
        "params",
        "input",
        "feature-mix layers (default)",
        "invariants",
        "compute strategies that apply (modules)",
        "FLOPs, everything skipped/slimmed",
    ]
    rows = []
    started = time.perf_counter()
    for family in all_families():
        try:
            rows.append(examine(family))
        except Exception as error:  # a family that fails is a finding, not a crash
            rows.append([family.family, family.builder, "-", "-", "-", f"FAILS: {error}", "-", "-"])
        print(" | ".join(rows[-1]), file=sys.stderr)
    lines = [
        "## Any model: every torchvision family with default settings (`benchmarks/model_matrix.py`)",
        "",
        f"Random weights, {platform.machine()}, torch {torch.__version__}, "
        f"{time.perf_counter() - started:.0f} s. 'invariants': the full tier is bit-exact and a "
        "mixed batch equals the per-tier runs. The last column is the FLOPs of a tier that skips "
        "every skippable block and keeps the fewest channels the slimmer allows, relative to the "
        "full model (what the compute search can reach at most; it stops where utility would "
        "fall below the target).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    update_section("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
