"""The demo model zoo: torchvision models adapted to small inputs, trained once and cached.

An entry is a model on a dataset: resnet18 on Fashion-MNIST (its default) and on digits; vgg16,
mobilenet_v3_small and vit on digits; the segmenters deeplabv3 and fcn on digit scenes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision import models
from torchvision.models.vision_transformer import VisionTransformer

from nnobfuscator.zoo.cache import cache_dir, quick
from nnobfuscator.zoo.digits import Split, digits_splits
from nnobfuscator.zoo.fashion import fashion_mnist_splits
from nnobfuscator.zoo.scenes import SCENE_CLASSES, digit_scenes
from nnobfuscator.zoo.segmenters import small_deeplabv3, small_fcn
from nnobfuscator.zoo.training import evaluate_metric, recalibrate_batchnorm, train_model


def _small_resnet18(num_classes: int, in_channels: int) -> nn.Module:
    model = models.resnet18(weights=None, num_classes=num_classes)
    # A 3x3 stride-1 stem keeps spatial detail of 16x16 inputs (the ImageNet stem is 7x7 stride 2).
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return model


def _fashion_resnet18(num_classes: int, in_channels: int) -> nn.Module:
    model = models.resnet18(weights=None, num_classes=num_classes)
    # A 3x3 stride-2 stem and no max-pool: 28x28 inputs run at 14x14 in layer1 (a stride-1 stem
    # trains about three times slower on 2 cores for about a point of accuracy).
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _small_vgg16(num_classes: int, in_channels: int) -> nn.Module:
    # The batch-norm variant: plain VGG16 reached only 88.6% on digits with the same budget.
    model = models.vgg16_bn(weights=None, num_classes=num_classes)
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


def _small_mobilenet_v3(num_classes: int, in_channels: int) -> nn.Module:
    model = models.mobilenet_v3_small(weights=None, num_classes=num_classes)
    # A stride-1 stem: 32x32 inputs end as a 2x2 map after the four remaining stride-2 stages
    # (the ImageNet stride-2 stem would collapse them to 1x1).
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(
        in_channels, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False
    )
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")  # as torchvision's
    return model


_VIT_IMAGE_SIZE, _VIT_PATCH, _VIT_HIDDEN = 16, 4, 64


def _small_vit(num_classes: int, in_channels: int) -> nn.Module:
    # torchvision's VisionTransformer itself (not a subclass), with small dimensions: 16x16 inputs
    # give 4x4 patches of 4x4 pixels, plus the class token.
    model = VisionTransformer(
        image_size=_VIT_IMAGE_SIZE,
        patch_size=_VIT_PATCH,
        num_layers=4,
        num_heads=4,
        hidden_dim=_VIT_HIDDEN,
        mlp_dim=128,
        num_classes=num_classes,
    )
    model.conv_proj = nn.Conv2d(in_channels, _VIT_HIDDEN, kernel_size=_VIT_PATCH, stride=_VIT_PATCH)
    fan_in = in_channels * _VIT_PATCH * _VIT_PATCH  # torchvision's init of its patch projection
    nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / fan_in))
    nn.init.zeros_(model.conv_proj.bias)
    return model


QUICK_EPOCHS = 2  # epochs in quick mode (NNOBF_ZOO_QUICK=1: tests of examples)
TRAIN_THREADS = 2  # demo models train with this many threads, wherever they train


@dataclass(frozen=True)
class ZooEntry:
    """A demo model: its builder, task, dataset, input size and training recipe.

    ``reestimate_bn``: after training, recompute the BatchNorm running statistics on the
    training split (:func:`recalibrate_batchnorm`) before the model is evaluated and cached.
    ``train_size``: training scenes to draw (digit scenes; ``None``: the dataset's default).
    ``flips``: mirror random halves of training batches (data whose meaning a mirror keeps).
    """

    builder: Callable[[int, int], nn.Module]
    image_size: int
    epochs: int
    lr: float
    optimizer: str
    task: str = "classification"
    dataset: str = "digits"
    batch_size: int = 64
    reestimate_bn: bool = False
    train_size: int | None = None
    revision: int = 1  # bump when the builder changes, so cached weights are retrained
    flips: bool = False
    label_smoothing: float = 0.0

    def recipe(self, epochs: int | None = None, seed: int = 0) -> dict[str, Any]:
        """Everything that decides the trained weights (stored with them, and in artifacts).

        ``seed`` fixes the initial weights and the training order (0: the demo models).
        """
        if epochs is None and quick():
            epochs = QUICK_EPOCHS
        return {
            "builder": f"{self.builder.__name__}/r{self.revision}",
            "image_size": self.image_size,
            "epochs": epochs or self.epochs,
            "lr": self.lr,
            "optimizer": self.optimizer,
            "batch_size": self.batch_size,
            "reestimate_bn": self.reestimate_bn,
            "seed": seed,
            "threads": TRAIN_THREADS,
            **({"train_size": self.train_size} if self.train_size else {}),
            **({"flips": True} if self.flips else {}),
            **({"label_smoothing": self.label_smoothing} if self.label_smoothing else {}),
            **({"quick": True} if quick() else {}),
        }

    @property
    def num_classes(self) -> int:
        return len(SCENE_CLASSES) if self.dataset == "digit-scenes" else 10

    def splits(self) -> dict[str, Split]:
        if self.dataset == "digit-scenes":
            counts = {"train": self.train_size} if self.train_size else None
            return digit_scenes(self.image_size, counts=counts)
        if self.dataset == "fashion-mnist":
            return fashion_mnist_splits(self.image_size)
        return digits_splits(self.image_size)


#: (model, dataset) -> entry; a model's first dataset here is its default
_ZOO: dict[tuple[str, str], ZooEntry] = {
    # 2 epochs of 50,000 images: 90.9% test in 7.5 minutes on 2 cores (3 epochs of 30,000
    # reached 89.6%; SGD at 0.1 90.7%; label smoothing added about 0.2 points)
    ("resnet18", "fashion-mnist"): ZooEntry(
        _fashion_resnet18,
        image_size=28,
        epochs=2,
        lr=3e-3,
        optimizer="adamw",
        dataset="fashion-mnist",
        batch_size=128,
        flips=True,
        label_smoothing=0.1,
    ),
    ("resnet18", "digits"): ZooEntry(
        _small_resnet18, image_size=16, epochs=15, lr=2e-3, optimizer="adamw"
    ),
    ("vgg16", "digits"): ZooEntry(
        _small_vgg16, image_size=32, epochs=20, lr=2e-3, optimizer="adamw", revision=2
    ),
    ("mobilenet_v3_small", "digits"): ZooEntry(
        _small_mobilenet_v3, 32, epochs=20, lr=2e-3, optimizer="adamw", reestimate_bn=True
    ),
    ("vit", "digits"): ZooEntry(_small_vit, _VIT_IMAGE_SIZE, epochs=60, lr=1e-3, optimizer="adamw"),
    ("deeplabv3", "digit-scenes"): ZooEntry(
        small_deeplabv3,
        48,
        24,
        3e-3,
        "adamw",
        "segmentation",
        "digit-scenes",
        batch_size=16,
        train_size=1600,
        revision=2,
    ),
    ("fcn", "digit-scenes"): ZooEntry(
        small_fcn,
        48,
        20,
        3e-3,
        "adamw",
        "segmentation",
        "digit-scenes",
        batch_size=16,
        train_size=1200,
        revision=2,
    ),
}


def list_models(task: str | None = None) -> list[str]:
    """Names of the demo models (of one task, when given)."""
    return sorted({name for (name, _), entry in _ZOO.items() if task in (None, entry.task)})


def model_datasets(name: str) -> list[str]:
    """The datasets a demo model trains on, its default first."""
    found = [dataset for (model, dataset) in _ZOO if model == name]
    if not found:
        raise ValueError(f"unknown demo model {name!r}; choose one of {list_models()}")
    return found


def zoo_entry(name: str, dataset: str | None = None) -> ZooEntry:
    """The entry of demo model ``name`` on ``dataset`` (``None``: the model's default dataset).

    Raises:
        ValueError: an unknown model, or a dataset the model has no recipe for.
    """
    datasets = model_datasets(name)
    dataset = dataset or datasets[0]
    if dataset not in datasets:
        raise ValueError(
            f"demo model {name!r} has no recipe for dataset {dataset!r}; it trains on "
            + ", ".join(datasets)
        )
    return _ZOO[(name, dataset)]


def build_model(
    name: str,
    *,
    dataset: str | None = None,
    num_classes: int | None = None,
    in_channels: int = 1,
) -> nn.Module:
    """An untrained demo model (torchvision architecture, ``weights=None``)."""
    entry = zoo_entry(name, dataset)
    return entry.builder(num_classes or entry.num_classes, in_channels)


build_classifier = build_model


def _cache_stem(name: str, entry: ZooEntry, recipe: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    return cache_dir() / f"{name}-{entry.dataset}-{digest}"


def is_cached(
    name: str, *, dataset: str | None = None, epochs: int | None = None, seed: int = 0
) -> bool:
    """Whether the demo model is trained and cached (:func:`load_zoo_model` will not train)."""
    entry = zoo_entry(name, dataset)
    stem = _cache_stem(name, entry, entry.recipe(epochs, seed))
    return stem.with_suffix(".safetensors").is_file() and stem.with_suffix(".json").is_file()


def load_zoo_model(
    name: str,
    *,
    dataset: str | None = None,
    progress: bool = True,
    epochs: int | None = None,
    retrain: bool = False,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """The demo model trained on its dataset: from the cache, or trained now and cached.

    ``dataset``: one of :func:`model_datasets` (``None``: the model's default, Fashion-MNIST for
    resnet18). ``seed``: another seed trains another model of the same recipe (cached apart; 0 is
    the demo's).

    Returns:
        The model in eval mode and its info (image size, test metric, training time).

    Raises:
        FashionMNISTMissing: a Fashion-MNIST model must train and the data is not installed.
    """
    from nnobfuscator.tasks import get_task

    entry = zoo_entry(name, dataset)
    recipe = entry.recipe(epochs, seed)
    stem = _cache_stem(name, entry, recipe)
    weights_path, info_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if weights_path.is_file() and info_path.is_file() and not retrain:
        model = build_model(name, dataset=entry.dataset)
        model.load_state_dict(load_file(str(weights_path)))
        return model.eval(), json.loads(info_path.read_text())
    splits = entry.splits()
    task = get_task(entry.task)
    threads = torch.get_num_threads()
    # Same seed, same data order and the same thread count (float sums are ordered by threads):
    # two machines of the same kind train the same weights.
    torch.set_num_threads(TRAIN_THREADS)
    try:
        torch.manual_seed(recipe["seed"])  # fixes the initial weights and the training order
        model = build_model(name, dataset=entry.dataset)
        seconds = train_model(
            model,
            splits["train"],
            epochs=recipe["epochs"],
            lr=entry.lr,
            optimizer=entry.optimizer,
            batch_size=entry.batch_size,
            read_logits=task.logits,
            progress=progress,
            description=f"training {name} on {entry.dataset} (once; cached)",
            flips=entry.flips,
            label_smoothing=entry.label_smoothing,
        )
        if entry.reestimate_bn:
            start = time.perf_counter()
            recalibrate_batchnorm(model, splits["train"].images)
            seconds += time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    info = {
        "model": name,
        "task": entry.task,
        "dataset": entry.dataset,
        "image_size": entry.image_size,
        "epochs": recipe["epochs"],
        "recipe": recipe,
        "torch": torch.__version__,
        "train_seconds": round(seconds, 1),
        f"test_{task.metric}": evaluate_metric(model, splits["test"], task),
    }
    tmp = weights_path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights_path)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return model.eval(), info


load_zoo_classifier = load_zoo_model
