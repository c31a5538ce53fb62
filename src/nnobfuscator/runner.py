"""Fast repeated evaluation of one data split at many tier settings.

Calibration evaluates the same inputs dozens of times at different strengths. Everything before
the first module any strategy wraps is identical each time, so it runs once and is cached, for
models whose forward can be cut into stages (a registry keyed by model type, filled for
torchvision's common families; :func:`register_stages` adds others). Other models are run whole.
Every run goes through the model's :class:`~nnobfuscator.executor.TierExecutor`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import (
    VGG,
    ConvNeXt,
    EfficientNet,
    MobileNetV3,
    ResNet,
    VisionTransformer,
)
from torchvision.models.segmentation._utils import _SimpleSegmentationModel

from nnobfuscator.executor import invoke
from nnobfuscator.outputs import batch_size as count_samples
from nnobfuscator.outputs import read_output, select
from nnobfuscator.registry import TypeRegistry

Stage = tuple[str, Callable[[Any], Any] | None]
RESIZE_TO_INPUT = "resize-to-input"  # a stage that scales dense logits to the input's size
_flatten = partial(torch.flatten, start_dim=1)

STAGES: TypeRegistry[tuple[type, Callable[[nn.Module], list[Stage]]]] = TypeRegistry("stage map")


def register_stages(
    model_type: type[nn.Module], stages: Callable[[nn.Module], list[Stage]]
) -> None:
    """Say how ``model_type``'s forward splits into named stages (used while its forward is the
    class's own, not overridden by a subclass)."""
    STAGES.register(model_type, (model_type, stages))


def _resnet(model: ResNet) -> list[Stage]:
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    return [(n, getattr(model, n)) for n in names] + [("flatten", _flatten), ("fc", model.fc)]


def _features_pool_classifier(model: nn.Module) -> list[Stage]:
    """VGG, MobileNetV3, EfficientNet, ConvNeXt: features, average pool, classifier."""
    stages: list[Stage] = [(f"features.{i}", m) for i, m in enumerate(model.features)]
    return stages + [
        ("avgpool", model.avgpool),
        ("flatten", _flatten),
        ("classifier", model.classifier),
    ]


def _vit(model: VisionTransformer) -> list[Stage]:
    def embed(x: torch.Tensor) -> torch.Tensor:
        x = model._process_input(x)
        token = model.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([token, x], dim=1)
        return model.encoder.dropout(x + model.encoder.pos_embedding)

    layers = [(f"encoder.layers.{n}", m) for n, m in model.encoder.layers.named_children()]
    return [
        ("embed", embed),
        *layers,
        ("encoder.ln", model.encoder.ln),
        ("token", lambda x: x[:, 0]),
        ("heads", model.heads),
    ]


def _segmentation(model: _SimpleSegmentationModel) -> list[Stage]:
    """DeepLabV3, FCN: backbone stages, head, upsampling (``out`` only; aux is not scored)."""
    stages: list[Stage] = [(f"backbone.{n}", m) for n, m in model.backbone.named_children()]
    return stages + [("classifier", model.classifier), (RESIZE_TO_INPUT, None)]


register_stages(ResNet, _resnet)
for _family in (VGG, MobileNetV3, EfficientNet, ConvNeXt):
    register_stages(_family, _features_pool_classifier)
register_stages(VisionTransformer, _vit)
register_stages(_SimpleSegmentationModel, _segmentation)
register_stages(nn.Sequential, lambda model: [(str(i), m) for i, m in enumerate(model)])


def model_stages(model: nn.Module) -> list[Stage] | None:
    """The model's forward as named stages, or ``None`` when it is not known (run it whole)."""
    found = STAGES.lookup(model)
    if found is None:
        return None
    cls, stages = found
    return stages(model) if type(model).forward is cls.forward else None


def _first_stage(stages: list[Stage], layer_names: list[str]) -> int:
    for index, (stage, _) in enumerate(stages):
        if any(name == stage or name.startswith(stage + ".") for name in layer_names):
            return index
    return len(stages)


def _run(stages: list[Stage], x: Any, inputs: torch.Tensor) -> Any:
    for name, stage in stages:
        if name == RESIZE_TO_INPUT:
            x = F.interpolate(x, size=inputs.shape[-2:], mode="bilinear", align_corners=False)
        else:
            assert stage is not None
            x = stage(x)
    return x


class SplitRunner:
    """Outputs of a fixed set of inputs at any tier, reusing what tiers cannot change.

    The prefix of the network before the first wrapped module is run once per distinct input
    variant (tiers that downscale their input get their own cached prefix).

    Args:
        model: the tiered model (anything with ``executor``, ``strategies`` and ``base_model``).
        inputs: the inputs (an image batch, a dict of tensors, a list of prompts).
        read_logits: turns a model output into the tensor that is scored.
        batch_size: evaluation batch size.
    """

    def __init__(
        self,
        model: Any,
        inputs: Any,
        read_logits: Callable[[Any], torch.Tensor] = read_output,
        batch_size: int = 256,
    ) -> None:
        self.model = model
        self.executor = model.executor
        self.read_logits = read_logits
        count = count_samples(inputs)
        self.batches = [
            select(inputs, torch.arange(start, min(start + batch_size, count)))
            for start in range(0, count, batch_size)
        ]
        layer_names = [n for s in model.strategies.values() for n in s.layers]
        stages = model_stages(model.base_model) if isinstance(inputs, torch.Tensor) else None
        self.prefix: list[Stage] | None = None
        self.suffix: list[Stage] = []
        if not layer_names and isinstance(inputs, torch.Tensor):  # the whole forward is a prefix
            self.prefix = [("model", partial(invoke, model.base_model))]
        elif stages is not None:
            split = _first_stage(stages, layer_names)
            self.prefix, self.suffix = stages[:split], stages[split:]
        self._cached: dict[Any, list[Any]] = {}
        self._full: torch.Tensor | None = None

    def full_logits(self) -> torch.Tensor:
        """Outputs of the untouched model (computed once)."""
        if self._full is None:
            self._full = self.logits(None)
        return self._full

    def _prefixes(self, tier: str | None) -> list[Any]:
        """Cached prefix activations per batch for the input variant ``tier`` sees."""
        signature = tuple(
            None if tier is None else s.input_signature(tier)
            for s in self.model.strategies.values()
        )
        if signature not in self._cached:
            if len(self._cached) >= 4:  # bound memory: forget the oldest input variant
                self._cached.pop(next(iter(self._cached)))
            self._cached[signature] = [None] * len(self.batches)
        return self._cached[signature]

    @torch.inference_mode()
    def logits(self, tier: str | None) -> torch.Tensor:
        """Scored outputs of every input at ``tier`` (``None``: the untouched model).

        The prefix runs inside the tier's run (it holds no wrapped module, so the tier cannot
        change it) on the input as the tier transforms it, and is kept for the next call.
        """
        active = self.executor.active(tier)
        prefixes = self._prefixes(active) if self.prefix is not None else []
        outputs = []
        for index, batch in enumerate(self.batches):
            body = None
            if self.prefix is not None:

                def body(x: Any, index: int = index) -> Any:
                    if prefixes[index] is None:
                        prefixes[index] = _run(self.prefix, x, x)
                    return _run(self.suffix, prefixes[index], x)

            output = self.executor.run(active, batch, body=body)
            outputs.append(self.read_logits(output).float())
        return torch.cat(outputs)
