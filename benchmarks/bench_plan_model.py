"""A model the project has never seen, calibrated through a plan, lands like the demo models.

The owner trains torchvision's MobileNetV3-Small (its own 3-channel stem, ``weights=None``) on
Fashion-MNIST at 32 px, grey repeated to RGB, with a split of their own: images of the official
train set only, 12,000 for training. Calibration and test data are folders of PNG files (an
ImageFolder per split, 2,500 images each) drawn from the official test set. The plan names the
architecture, the weights file and the folders, with ``compute: auto``; ``nnobf calibrate`` runs
it. Each tier's test accuracy is set against its target and two standard errors of the gap.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from _common import QUICK, Section, where
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision import models

from nnobfuscator.core.data import Split
from nnobfuscator.jobs.run import run_job
from nnobfuscator.jobs.sources import IMAGENET_MEAN, IMAGENET_STD
from nnobfuscator.tasks.training import train_model
from nnobfuscator.zoo import cache_dir
from nnobfuscator.zoo.fashion import FASHION_CLASSES, _official
from nnobfuscator.zoo.training import recalibrate_batchnorm

HEADING = "## A held-out model calibrated through a plan (`make bench`)"
SIZE, TRAIN, PER_SPLIT, EPOCHS = 32, 12_000, 2_500, 4
TIERS = "free=60%,pro=85%,premium=full"


def _rgb(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear")
    x = x.repeat(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _owner_model(folder: Path) -> Path:
    """The owner's trained weights (trained once, cached)."""
    weights = folder / f"mobilenet_v3_small-fashion-{TRAIN}-{EPOCHS}.safetensors"
    if weights.is_file():
        return weights
    images, labels = _official("train")
    order = np.random.default_rng(7).permutation(len(labels))[: 600 if QUICK else TRAIN]
    split = Split("train", _rgb(images[order]), torch.from_numpy(labels[order].astype(np.int64)))
    torch.manual_seed(7)
    model = models.mobilenet_v3_small(weights=None, num_classes=10)
    train_model(
        model,
        split,
        epochs=1 if QUICK else EPOCHS,
        lr=3e-3,
        optimizer="adamw",
        batch_size=128,
        flips=True,
        description="owner trains mobilenet_v3_small",
    )
    # torchvision's MobileNetV3 keeps BatchNorm statistics with momentum 0.01: after a short
    # training they are stale and the model answers one class in eval mode; the owner refreshes
    # them on the training images, as anyone shipping such a model does
    recalibrate_batchnorm(model, split.images)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return weights


def _folders(root: Path) -> dict[str, Path]:
    """Calibration and test ImageFolders (PNG, class-name folders) from the official test set."""
    images, labels = _official("t10k")
    order = np.random.default_rng(11).permutation(len(labels))
    count = 200 if QUICK else PER_SPLIT
    parts = {"calibration": order[:count], "test": order[count : 2 * count]}
    folders = {}
    for name, index in parts.items():
        folder = root / name
        folders[name] = folder
        if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == len(index):
            continue
        for i in index:
            # ImageFolder numbers classes in the sorted order of folder names: the label first
            target = folder / f"{labels[i]}-{FASHION_CLASSES[labels[i]].replace('/', '-')}"
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(target / f"{i}.png")
    return folders


def run() -> Section:
    root = cache_dir() / "bench-plan-model"
    root.mkdir(parents=True, exist_ok=True)
    weights = _owner_model(root)
    folders = _folders(root / "data")
    plan = {
        "model": {"arch": "mobilenet_v3_small", "weights": str(weights), "num_classes": 10},
        "data": {
            "calibration": str(folders["calibration"]),
            "test": str(folders["test"]),
            "image_size": SIZE,
        },
        "tiers": TIERS,
        "compute": "auto",
    }
    (root / "plan.yaml").write_text(yaml.safe_dump(plan))
    started = time.perf_counter()
    result = run_job(
        task="classification",
        model_source=plan["model"],
        data_source=plan["data"],
        tiers=TIERS,
        strategy="auto",
        compute="auto",
        out=root / "artifact",
        progress=False,
    )
    seconds = time.perf_counter() - started
    report = result.report
    rows = []
    for tier in report["tiers"]:
        extra = tier.get("extra", {})
        rows.append(
            {
                "tier": tier["name"],
                "target": tier["target"],
                "calibration": tier["achieved"]["calibration"],
                "test": tier["achieved"]["test"],
                "gap": extra.get("target_gap"),
                "two_se": extra.get("two_se"),
                "cost": tier["relative_cost"],
                "strategy": tier["strategy"],
            }
        )
    return _section(rows, report, seconds, load_file(str(weights)))


def _section(rows: list[dict[str, Any]], report: dict, seconds: float, state: dict) -> Section:
    lines = [
        HEADING,
        "",
        f"{where()}. torchvision's MobileNetV3-Small (`weights=None`, ImageNet stem), trained by "
        f"its owner on {TRAIN:,} Fashion-MNIST train images at {SIZE} px, grey repeated to RGB "
        f"({EPOCHS} epochs, AdamW); calibration and test are ImageFolders of {PER_SPLIT:,} PNGs "
        "each from the official test set; the plan (`nnobf calibrate`) gives the architecture, "
        f"the weights file, the folders, tiers `{TIERS}` and `compute: auto`. The compute search "
        "runs on one half of the calibration split and the strengths land on the other half. "
        f"Full model: {100 * report['base']['test']:.1f}% test. Calibration and evaluation took "
        f"{seconds:.0f} s.",
        "",
        "| tier | strategy | FLOPs | target | calibration | test | test − target | 2 SE | within |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["target"] is None:
            continue
        within = abs(r["gap"]) <= r["two_se"]
        lines.append(
            f"| {r['tier']} | {r['strategy']} | {r['cost']:.2f} | {100 * r['target']:.1f} | "
            f"{100 * r['calibration']:.1f} | {100 * r['test']:.1f} | {100 * r['gap']:+.1f} | "
            f"{100 * r['two_se']:.1f} | {'yes' if within else '**no**'} |"
        )
    landed = [r for r in rows if r["target"] is not None]
    summary = [
        (
            "Held-out MobileNetV3-Small through a plan: test − target (2 SE)",
            ", ".join(
                f"{r['tier']} {100 * r['gap']:+.1f} (±{100 * r['two_se']:.1f})" for r in landed
            ),
        )
    ]
    return Section("plan-model", "\n".join(lines) + "\n", summary, {"rows": rows})


if __name__ == "__main__":
    print(run().markdown)
