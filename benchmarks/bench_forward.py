"""Forward time of a tier vs the plain model, measured as ratios in one run.

Run: ``make bench`` (or ``python benchmarks/bench_forward.py``). Writes ``benchmarks/RESULTS.md``.
Weights are untrained: time does not depend on them. Repeats are interleaved (plain, tier, plain,
tier, ...) so drifts in machine load hit both sides alike; the median of each side is compared.
"""

from __future__ import annotations

import platform
import statistics
import time
from datetime import date

import torch
from _results import update_section

from nnobfuscator import InputSpec, obfuscate
from nnobfuscator.zoo import build_classifier
from nnobfuscator.zoo.classifiers import zoo_entry

REPEATS = 30
BATCH = 64


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def bench(model_name: str, strategy: str) -> dict[str, float]:
    size = zoo_entry(model_name).image_size
    plain = build_classifier(model_name).eval()
    x = torch.randn(BATCH, 1, size, size)
    reference = build_classifier(model_name).eval()
    reference.load_state_dict(plain.state_dict())
    tiered = obfuscate(
        plain,
        tiers="free=0.5,premium=full",
        strategy=strategy,
        key=b"b" * 32,
        input_spec=InputSpec(1, size, size),
    )
    tiered.set_strength("free", strategy, 0.5 * tiered.strategies[strategy].max_strength)
    mixed = ["free", "premium"] * (BATCH // 2)
    runs = {
        "plain": lambda: reference(x),
        "free": lambda: tiered(x, tier="free"),
        "full": lambda: tiered(x, tier="premium"),
        "mixed": lambda: tiered(x, tiers=mixed),
    }
    for fn in runs.values():  # warm-up (also fills the per-tier weight cache)
        fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(REPEATS):
        for name, fn in runs.items():
            samples[name].append(_time(fn))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "plain_ms": 1000 * medians["plain"],
        "free_ratio": medians["free"] / medians["plain"],
        "full_ratio": medians["full"] / medians["plain"],
        "mixed_ratio": medians["mixed"] / medians["plain"],
    }


def main() -> None:
    rows = []
    for model_name in ("resnet18", "vgg16"):
        for strategy in ("feature-mix", "weight-noise", "logit-noise"):
            result = bench(model_name, strategy)
            rows.append((model_name, strategy, result))
            print(model_name, strategy, {k: round(v, 3) for k, v in result.items()}, flush=True)
    lines = [
        "## Forward time of a tier vs the plain model (`benchmarks/bench_forward.py`)",
        "",
        f"Measured {date.today()} on {platform.machine()} CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; batch {BATCH}, median of {REPEATS} interleaved repeats. "
        "Ratios are time / plain-model time in the same run (1.00 = no overhead). *mixed* is one "
        "batch with half the samples at the lowered tier and half at full: it runs one forward per "
        "tier present (here two half-size passes), so small models pay their fixed per-call cost "
        "twice.",
        "",
        "| model | strategy | plain model (ms/batch) | lowered tier | full tier | mixed batch |",
        "|---|---|---|---|---|---|",
    ]
    for model_name, strategy, r in rows:
        lines.append(
            f"| {model_name} | {strategy} | {r['plain_ms']:.1f} | {r['free_ratio']:.3f} | "
            f"{r['full_ratio']:.3f} | {r['mixed_ratio']:.3f} |"
        )
    section = "\n".join(lines) + "\n"
    update_section(section)
    print(section)


if __name__ == "__main__":
    main()
