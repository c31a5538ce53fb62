"""Shared by the ``make bench`` sections: settings, timing, machine facts, calibrated zoo models.

Only the public API is used: ``obfuscate``, ``calibrate``, ``TieredModel.__call__``,
``nnobfuscator.jobs.sources`` and ``nnobfuscator.zoo``.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import torch
from torch import nn

from nnobfuscator import InputSpec, TieredModel, calibrate, obfuscate
from nnobfuscator.core.data import Split
from nnobfuscator.jobs.sources import load_split
from nnobfuscator.zoo import load_zoo_model
from nnobfuscator.zoo.classifiers import build_model, is_cached, zoo_entry

#: ``BENCH_QUICK=1``: a few repeats only, to check that every section runs (numbers mean nothing)
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
#: ``BENCH_TRAIN_ALL=1``: train the segmenters when they are not cached (13 min on 2 cores);
#: otherwise their latency rows use untrained weights and fixed strengths
TRAIN_ALL = os.environ.get("BENCH_TRAIN_ALL", "") not in ("", "0")
TIERS = "free=60%,pro=85%,premium=full"
TIERS_10 = ",".join(f"t{i}={50 + 5 * i}%" for i in range(9)) + ",premium=full"
KEY = b"b" * 32
#: the demo models of ``nnobf demo``, by task (sd-digits has its own bench_text_to_image.py)
DEMO_MODELS = ("resnet18", "vgg16", "deeplabv3", "fcn")


def repeats(full: int, quick: int = 3) -> int:
    """``full`` repeats, or ``quick`` under ``BENCH_QUICK``."""
    return quick if QUICK else full


def devices() -> list[str]:
    """``cpu``, plus ``cuda`` when a GPU is there."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def interleaved_ms(
    runs: dict[str, Callable[[], Any]], count: int, device: str = "cpu"
) -> dict[str, float]:
    """Median milliseconds per call of each run; repeats interleave the runs (a, b, c, a, b, c,
    ...) so drifts in machine load hit all of them alike. One untimed warm-up call each."""
    for fn in runs.values():
        fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(count):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(1000 * (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in samples.items()}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo").read().splitlines():  # noqa: SIM115
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Facts about the machine and the software, for the RESULTS.md header."""
    import torchvision

    facts: dict[str, Any] = {
        "date": date.today().isoformat(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "quick": QUICK,
        "load_average": round(os.getloadavg()[0], 2),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def where(device: str = "cpu") -> str:
    """One phrase naming what ran it: CPU threads or the GPU."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


@dataclass
class Section:
    """What a benchmark section produced: its RESULTS.md text, README summary rows, raw data."""

    name: str
    markdown: str
    summary: list[tuple[str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Tiered:
    """A tiered demo model and what came with it.

    Args:
        plain: an unwrapped copy of the same weights (the baseline of every ratio).
        weights: ``"trained"``, or ``"untrained"`` (fixed strengths, not calibrated).
        report: the calibration report (``None`` when not calibrated).
        calibrate_s: wall time of ``calibrate`` (seconds).
        original: storage pointers of the user's tensors before wrapping (for memory accounting).
    """

    name: str
    model: TieredModel
    plain: nn.Module
    weights: str
    calibration: Split
    test: Split
    report: dict[str, Any] | None = None
    calibrate_s: float | None = None
    original: set[int] = field(default_factory=set)

    def tier_rows(self) -> list[dict[str, Any]]:
        return list(self.report["tiers"]) if self.report else []

    def relative_cost(self, tier: str) -> float | None:
        row = next((t for t in self.tier_rows() if t["name"] == tier), None)
        return None if row is None else float(row["relative_cost"])


def storages(model: nn.Module) -> set[int]:
    """Data pointers of the storages behind a model's parameters and buffers."""
    return {t.untyped_storage().data_ptr() for t in model.state_dict().values()}


_CACHE: dict[tuple[Any, ...], Tiered] = {}


def data_source(name: str) -> dict[str, Any]:
    entry = zoo_entry(name)
    return {"zoo": entry.dataset, "image_size": entry.image_size}


def tiered_zoo_model(
    name: str,
    *,
    seed: int = 0,
    strategy: str = "feature-mix",
    compute: str | None = "auto",
    tiers: str = TIERS,
    train: bool = True,
) -> Tiered:
    """A demo model, wrapped and calibrated (memoised for the whole run).

    ``train=False``: when the trained model is not cached, use untrained weights of the same
    architecture with fixed strengths instead (good for timing, no compute settings).
    """
    key = (name, seed, strategy, compute, tiers, train)
    if key in _CACHE:
        return _CACHE[key]
    entry = zoo_entry(name)
    data = data_source(name)
    cal, test = load_split(data, "calibration"), load_split(data, "test")
    trained = train or is_cached(name, seed=seed)
    if trained:
        base, _ = load_zoo_model(name, seed=seed, progress=True)
    else:
        torch.manual_seed(seed)
        base = build_model(name).eval()
    plain = copy.deepcopy(base).eval()
    original = storages(base)
    tiered = obfuscate(
        base,
        tiers=tiers,
        strategy=strategy,
        compute=compute if trained else None,
        key=KEY,
        task=entry.task,
        input_spec=InputSpec(*cal.inputs.shape[1:]),
        model_name=name,
    )
    result = Tiered(name, tiered, plain, "trained" if trained else "untrained", cal, test)
    result.original = original
    if trained:
        started = time.perf_counter()
        result.report = calibrate(tiered, cal, test, dataset=entry.dataset, progress=not QUICK)
        result.calibrate_s = time.perf_counter() - started
        print(
            f"calibrated {name} seed {seed} {strategy} compute={compute}: {result.calibrate_s:.1f} s"
        )
    else:
        lowered = [t for t in tiered.tier_names if not tiered.get_tier(t).is_full]
        for rank, tier in enumerate(lowered):
            for strategy_name, degrading in tiered.degrading.items():
                strength = (1 - rank / max(1, len(lowered))) * 0.5 * degrading.max_strength
                tiered.set_strength(tier, strategy_name, strength)
    _CACHE[key] = result
    return result


def run_every_tier(tiered: TieredModel, x: torch.Tensor) -> None:
    """One call at each tier and one mixed batch (fills whatever per-tier state is lazy)."""
    with torch.inference_mode():
        for tier in tiered.tier_names:
            tiered(x, tier=tier)
        names = tiered.tier_names
        tiered(x, tiers=[names[i % len(names)] for i in range(len(x))])


def mixed_tiers(tiered: TieredModel, batch: int) -> list[str]:
    """A batch's tiers, equal shares of every tier, interleaved."""
    names = tiered.tier_names
    return [names[i % len(names)] for i in range(batch)]


def batch_of(split: Split, size: int) -> torch.Tensor:
    """``size`` inputs from a split (repeated when the split is smaller)."""
    inputs = split.inputs
    if len(inputs) < size:
        inputs = inputs.repeat(-(-size // len(inputs)), *([1] * (inputs.dim() - 1)))
    return inputs[:size].contiguous()


def fmt_ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.1f}"
