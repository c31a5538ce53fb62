"""Every torchvision model family at its smallest, with random weights and the smallest input it
takes: the matrix the core is tested and measured on (nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision import models

from nnobfuscator.zoo.training import recalibrate_batchnorm

# Input sizes below 32 pixels fail in these families (strided stems, fixed windows, patch grids).
_INPUT_SIZE = {"alexnet": 64, "inception": 80, "swin_transformer": 64, "maxvit": 224}
_OPTIONS: dict[str, dict[str, Any]] = {
    "vision_transformer": {"image_size": 32},
    "maxvit": {"input_size": (224, 224)},
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception": {"aux_logits": False, "init_weights": True},
}
SEGMENTATION_CLASSES = 4
CLASSES = 10


@dataclass(frozen=True)
class Family:
    """One torchvision family: its smallest builder, task, input size and builder options."""

    family: str
    builder: str
    task: str
    params: int
    input_size: int = 32
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, seed: int = 0) -> nn.Module:
        """The model with random weights (same ``seed``, same weights), in eval mode.

        BatchNorm statistics are measured on random images, so that activations neither vanish
        nor explode as they do with the default statistics of an untrained model, and layers
        initialised to zero (a ViT's head) get small random weights, so outputs depend on inputs.
        """
        torch.manual_seed(seed)
        if self.task == "segmentation":
            model = models.get_model(
                self.builder,
                weights=None,
                weights_backbone=None,
                num_classes=SEGMENTATION_CLASSES,
                aux_loss=False,
            )
        else:
            model = models.get_model(
                self.builder, weights=None, num_classes=CLASSES, **self.options
            )
        with torch.no_grad():
            for module in model.modules():
                weight = getattr(module, "weight", None)
                if isinstance(module, nn.Linear | nn.Conv2d) and not weight.any():
                    nn.init.normal_(weight, std=0.02)
            recalibrate_batchnorm(model, self.example(16, seed=seed + 100))
        return model.eval()

    def example(self, batch: int = 4, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        size = self.input_size
        return torch.randn(batch, 3, size, size, generator=generator)


def _num_params(name: str) -> int:
    return int(models.get_model_weights(name).DEFAULT.meta["num_params"])


def classification_families() -> list[Family]:
    """The smallest builder (by parameter count, from the weights' metadata) of every family."""
    smallest: dict[str, tuple[int, str]] = {}
    for name in models.list_models(module=models):
        family = models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        candidate = (_num_params(name), name)
        smallest[family] = min(smallest.get(family, candidate), candidate)
    return [
        Family(
            family,
            name,
            "classification",
            params,
            _INPUT_SIZE.get(family, 32),
            _OPTIONS.get(family, {}),
        )
        for family, (params, name) in sorted(smallest.items())
    ]


def segmentation_families() -> list[Family]:
    """Every torchvision segmentation builder."""
    return [
        Family(name, name, "segmentation", _num_params(name))
        for name in models.list_models(module=models.segmentation)
    ]


def all_families() -> list[Family]:
    return classification_families() + segmentation_families()
