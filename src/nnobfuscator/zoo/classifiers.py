"""torchvision classifiers adapted to small inputs, trained once on digits and cached."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision import models

from nnobfuscator.zoo.cache import cache_dir
from nnobfuscator.zoo.digits import digits_splits
from nnobfuscator.zoo.training import evaluate_accuracy, train_classifier


def _small_resnet18(num_classes: int, in_channels: int) -> nn.Module:
    model = models.resnet18(weights=None, num_classes=num_classes)
    # A 3x3 stride-1 stem keeps spatial detail of 16x16 inputs (the ImageNet stem is 7x7 stride 2).
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return model


def _small_vgg16(num_classes: int, in_channels: int) -> nn.Module:
    model = models.vgg16(weights=None, num_classes=num_classes)
    model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    # 32x32 inputs leave a 1x1 map after five pools: pool it and use a narrower classifier.
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Linear(512, 256),
        nn.ReLU(True),
        nn.Dropout(0.3),
        nn.Linear(256, 256),
        nn.ReLU(True),
        nn.Dropout(0.3),
        nn.Linear(256, num_classes),
    )
    return model


@dataclass(frozen=True)
class ZooEntry:
    """A demo model: its builder, the input size it is trained at and its training recipe."""

    builder: Callable[[int, int], nn.Module]
    image_size: int
    epochs: int
    lr: float
    optimizer: str


_ZOO: dict[str, ZooEntry] = {
    "resnet18": ZooEntry(_small_resnet18, image_size=16, epochs=15, lr=2e-3, optimizer="adamw"),
    "vgg16": ZooEntry(_small_vgg16, image_size=32, epochs=15, lr=5e-4, optimizer="adamw"),
}


def list_models() -> list[str]:
    """Names of the demo classifiers."""
    return sorted(_ZOO)


def zoo_entry(name: str) -> ZooEntry:
    try:
        return _ZOO[name]
    except KeyError:
        raise ValueError(f"unknown demo model {name!r}; choose one of {list_models()}") from None


def build_classifier(name: str, *, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """An untrained demo classifier (torchvision architecture, ``weights=None``)."""
    return zoo_entry(name).builder(num_classes, in_channels)


def load_zoo_classifier(
    name: str, *, progress: bool = True, epochs: int | None = None, retrain: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The demo classifier trained on digits: from the cache, or trained now and cached.

    Returns:
        The model in eval mode and its info (image size, test accuracy, training time).
    """
    entry = zoo_entry(name)
    epochs = epochs or entry.epochs
    stem = cache_dir() / f"{name}-digits-e{epochs}"
    weights_path, info_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    model = build_classifier(name)
    if weights_path.is_file() and info_path.is_file() and not retrain:
        model.load_state_dict(load_file(str(weights_path)))
        return model.eval(), json.loads(info_path.read_text())
    splits = digits_splits(entry.image_size)
    torch.manual_seed(0)
    seconds = train_classifier(
        model,
        splits["train"],
        epochs=epochs,
        lr=entry.lr,
        optimizer=entry.optimizer,
        progress=progress,
        description=f"training {name} on digits",
    )
    info = {
        "model": name,
        "dataset": "digits",
        "image_size": entry.image_size,
        "epochs": epochs,
        "train_seconds": round(seconds, 1),
        "test_accuracy": evaluate_accuracy(model, splits["test"]),
    }
    tmp = weights_path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights_path)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return model.eval(), info
