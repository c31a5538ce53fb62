"""Wall time per image of each text-to-image tier vs the plain pipeline, measured in one run.

Run: ``python benchmarks/bench_text_to_image.py ARTIFACT`` where ARTIFACT was written by
``nnobf demo --task text-to-image`` (default ``runs/sd-digits-feature-mix``). Loads the zoo
pipeline and the artifact, then times the plain pipeline, each tier and a mixed-tier batch at
batch sizes 1 and 32 (CUDA too when available), interleaving repeats so drifts in machine load
hit every variant alike. Updates its own section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from _results import update_section

from nnobfuscator import TieredModel
from nnobfuscator.jobs.sources import load_base_model

REPEATS = 7
BATCHES = (1, 32)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_device(artifact: Path, device: str) -> list[tuple[int, dict[str, float]]]:
    plain, _ = load_base_model({"zoo": "sd-digits"}, progress=True)  # a second, unwrapped copy
    pipeline, _ = load_base_model({"zoo": "sd-digits"}, progress=False)
    tiered = TieredModel.from_pretrained(artifact, pipeline).to(device)
    plain.to(device)
    rows = []
    for batch in BATCHES:
        runs = _runs(plain, tiered, batch)
        for fn in runs.values():
            fn()
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(REPEATS):
            for name, fn in runs.items():
                _sync(device)
                started = time.perf_counter()
                fn()
                _sync(device)
                samples[name].append(1000 * (time.perf_counter() - started) / batch)
        medians = {name: statistics.median(values) for name, values in samples.items()}
        rows.append((batch, medians))
        print(device, batch, {k: round(v, 2) for k, v in medians.items()}, flush=True)
    return rows


def _runs(pipeline, tiered: TieredModel, batch: int) -> dict:
    """The timed calls at one batch size: the plain (unwrapped) pipeline, each tier, a mixed
    batch."""
    words = ("zero", "seven", "four")
    inputs = {
        "prompt": [f"a handwritten digit {words[i % 3]}" for i in range(batch)],
        "seed": torch.arange(batch),
    }
    options = tiered.base_model.call_options

    def plain() -> None:
        generators = [torch.Generator().manual_seed(i) for i in range(batch)]
        pipeline(inputs["prompt"], generator=generators, **options)

    runs = {"plain": plain}
    runs.update({n: (lambda n=n: tiered(inputs, tier=n)) for n in tiered.tier_names})
    if batch >= 3:
        mixed = [tiered.tier_names[i % len(tiered.tier_names)] for i in range(batch)]
        runs["mixed"] = lambda: tiered(inputs, tiers=mixed)
    return runs


def main() -> None:
    artifact = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sd-digits-feature-mix")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [
        "## Text-to-image tiers (sd-digits)",
        "",
        f"`python benchmarks/bench_text_to_image.py {artifact}` on {date.today()}: torch "
        f"{torch.__version__}, {platform.machine()}, {torch.get_num_threads()} CPU threads"
        + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else "")
        + f". Median of {REPEATS} interleaved repeats, milliseconds per image; ratios against the "
        "plain pipeline in the same run.",
        "",
        "| device | batch | variant | ms / image | vs plain |",
        "|---|---|---|---|---|",
    ]
    for device in devices:
        for batch, medians in time_device(artifact, device):
            plain = medians["plain"]
            for name, value in medians.items():
                lines.append(f"| {device} | {batch} | {name} | {value:.2f} | {value / plain:.2f} |")
    update_section("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
