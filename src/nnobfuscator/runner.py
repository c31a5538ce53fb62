"""Fast repeated evaluation of one data split at many tier settings.

Calibration evaluates the same images dozens of times at different strengths. Everything before
the first module any strategy wraps is identical each time, so it runs once and is cached; for
output-only strategies (logit noise) the clean outputs themselves are cached.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VGG, ResNet
from torchvision.models.segmentation._utils import _SimpleSegmentationModel

from nnobfuscator.model import TieredModel

Stage = tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]
RESIZE_TO_INPUT = "resize-to-input"  # a stage that scales dense logits to the input's size


def model_stages(model: nn.Module) -> list[Stage] | None:
    """The model's forward as a list of named stages, for architectures whose forward is known.

    Returns ``None`` for other models (they are evaluated whole, without a cached prefix).
    """
    flatten = partial(torch.flatten, start_dim=1)
    if isinstance(model, ResNet) and type(model).forward is ResNet.forward:
        names = [
            "conv1",
            "bn1",
            "relu",
            "maxpool",
            "layer1",
            "layer2",
            "layer3",
            "layer4",
            "avgpool",
        ]
        return [(n, getattr(model, n)) for n in names] + [("flatten", flatten), ("fc", model.fc)]
    if isinstance(model, VGG) and type(model).forward is VGG.forward:
        stages: list[Stage] = [(f"features.{i}", m) for i, m in enumerate(model.features)]
        return stages + [
            ("avgpool", model.avgpool),
            ("flatten", flatten),
            ("classifier", model.classifier),
        ]
    if type(model) is nn.Sequential:
        return [(str(i), m) for i, m in enumerate(model)]
    if (
        isinstance(model, _SimpleSegmentationModel)
        and type(model).forward is _SimpleSegmentationModel.forward
    ):  # DeepLabV3, FCN: backbone stages, head, upsampling ("out" only; aux is not scored)
        stages = [(f"backbone.{n}", m) for n, m in model.backbone.named_children()]
        return stages + [("classifier", model.classifier), (RESIZE_TO_INPUT, None)]
    return None


def _first_stage(stages: list[Stage], layer_names: list[str]) -> int:
    for index, (stage, _) in enumerate(stages):
        if any(name == stage or name.startswith(stage + ".") for name in layer_names):
            return index
    return 0


class SplitRunner:
    """Logits of a fixed set of inputs at any tier, reusing what tiers cannot change.

    The prefix of the network before the first wrapped module is run once per distinct input
    (tiers that downscale their input get their own cached prefix).

    Args:
        model: the tiered model.
        images: the inputs, ``(N, C, H, W)``.
        read_logits: turns a model output into a logits tensor.
        batch_size: evaluation batch size.
    """

    def __init__(
        self,
        model: TieredModel,
        images: torch.Tensor,
        read_logits: Callable[[Any], torch.Tensor],
        batch_size: int = 256,
    ) -> None:
        self.model = model
        self.read_logits = read_logits
        self.batches = list(torch.split(images, batch_size))
        layer_names = [n for s in model.strategies.values() for n in s.layers]
        stages = model_stages(model.base_model)
        self.prefix: list[Stage] | None = None
        self.suffix: list[Stage] | None = None
        if not layer_names:  # no wrapped modules: the whole forward is the cacheable prefix
            self.prefix, self.suffix = [("model", model.base_model)], []
        elif stages is not None:
            split = _first_stage(stages, layer_names)
            self.prefix, self.suffix = stages[:split], stages[split:]
        self._cached: dict[Any, tuple[list[torch.Tensor], list[Any] | None]] = {}
        self._full: torch.Tensor | None = None

    def full_logits(self) -> torch.Tensor:
        """Logits of the untouched model (computed once)."""
        if self._full is None:
            self._full = self.logits(None)
        return self._full

    def _prepared(self, tier: str | None) -> tuple[list[torch.Tensor], list[Any] | None]:
        """The inputs as ``tier`` sees them, and their prefix outputs, cached per input variant."""
        strategies = [] if tier is None else list(self.model.strategies.values())
        signature = tuple(s.input_signature(tier) for s in strategies)  # type: ignore[arg-type]
        if signature not in self._cached:
            if len(self._cached) >= 4:  # bound memory: forget the oldest input variant
                self._cached.pop(next(iter(self._cached)))
            inputs = self.batches
            for strategy in strategies:
                inputs = [strategy.transform_input(b, tier) for b in inputs]  # type: ignore[arg-type]
            prefix = None
            if self.prefix is not None:
                with self.model.context.activate(None):
                    prefix = [_run(self.prefix, b, b) for b in inputs]
            self._cached[signature] = (inputs, prefix)
        return self._cached[signature]

    @torch.inference_mode()
    def logits(self, tier: str | None) -> torch.Tensor:
        """Logits of every input at ``tier`` (``None``: the untouched model)."""
        active = None if tier is None or self.model.tiers[tier].is_full else tier
        inputs, cached = self._prepared(active)
        outputs = []
        for index, batch in enumerate(self.batches):
            with self.model.context.activate(active):
                if cached is None or self.suffix is None:
                    output = self.model.base_model(inputs[index])
                else:
                    output = _run(self.suffix, cached[index], inputs[index])
            if active is not None:
                for strategy in self.model.strategies.values():
                    output = strategy.transform_output(output, batch, active)
            outputs.append(self.read_logits(output).float())
        return torch.cat(outputs)


def _run(stages: list[Stage], x: Any, inputs: torch.Tensor) -> Any:
    for name, stage in stages:
        if name == RESIZE_TO_INPUT:
            x = F.interpolate(x, size=inputs.shape[-2:], mode="bilinear", align_corners=False)
        else:
            assert stage is not None
            x = stage(x)
    return x
