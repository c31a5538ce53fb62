"""Fast repeated evaluation of one data split at many tier settings.

Calibration evaluates the same inputs dozens of times at different strengths. Everything before
the first module any strategy wraps is identical each time, so it runs once and is cached, for
models whose forward can be cut into stages (a registry keyed by model type, filled for
torchvision's common families; :func:`register_stages` adds others). Other models are run whole.
Every run goes through the model's :class:`~nnobfuscator.tiered.executor.TierExecutor`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import (
    VGG,
    ConvNeXt,
    EfficientNet,
    MobileNetV3,
    ResNet,
    VisionTransformer,
)
from torchvision.models.segmentation._utils import _SimpleSegmentationModel

from nnobfuscator.core.outputs import batch_size as count_samples
from nnobfuscator.core.outputs import read_output, select
from nnobfuscator.core.registry import TypeRegistry
from nnobfuscator.core.tier_pass import tensor_bytes
from nnobfuscator.strategies.bn_reestimate import Stats, find_store
from nnobfuscator.tiered.executor import invoke

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
    """VGG, MobileNetV3, EfficientNet, ConvNeXt: features, average pool, classifier.

    ``features`` is one stage when a tier runs it as a whole (a slimmed conv stack)."""
    features = model.features
    stages: list[Stage] = (
        [(f"features.{i}", m) for i, m in enumerate(features)]
        if isinstance(features, nn.Sequential)
        else [("features", features)]
    )
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


def wrapped_names(model: Any) -> list[str]:
    """Plain names of every module the tiered model wraps (strategies' layers and blocks, the
    BatchNorm layers compute tiers re-estimate): what a tier may run differently."""
    names = [n for s in model.strategies.values() for n in s.layers]
    host = getattr(model, "host", None)
    return names + list(getattr(host, "wrappers", {}))


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
    variant (tiers that downscale their input get their own cached prefix). At a tier, the longer
    prefix before the first layer of a strategy other than a compute one is cached per tier state
    (its compute settings, BatchNorm statistics and input variant): calibration's bisection
    changes only strengths, so the part of the network only compute tiers change runs once.

    Args:
        model: the tiered model (anything with ``executor``, ``strategies`` and ``base_model``).
        inputs: the inputs (an image batch, a dict of tensors, a list of prompts).
        read: turns a model output and the inputs of its batch into the tensor that is scored
            (``Task.read``; default: the output's main tensor).
        batch_size: evaluation batch size.
    """

    def __init__(
        self,
        model: Any,
        inputs: Any,
        read: Callable[[Any, Any], torch.Tensor] = lambda output, inputs: read_output(output),
        batch_size: int = 256,
    ) -> None:
        self.model = model
        self.executor = model.executor
        self.read = read
        count = count_samples(inputs)
        self.batches = [
            select(inputs, torch.arange(start, min(start + batch_size, count)))
            for start in range(0, count, batch_size)
        ]
        layer_names = wrapped_names(model)
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
        self.tier_prefix: list[Stage] | None = None
        self.tier_suffix: list[Stage] = []
        self._tier_cached: OrderedDict[Any, tuple[Any, list[Any]]] = OrderedDict()
        if stages is not None and self.prefix is not None and getattr(model, "compute", None):
            strength_names = [
                n for s in model.strategies.values() if s.role != "compute" for n in s.layers
            ]
            split = _first_stage(stages, strength_names)
            if split > len(self.prefix):
                self.tier_prefix, self.tier_suffix = stages[:split], stages[split:]

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

    def _tier_prefixes(self, tier: str) -> list[Any]:
        """Cached per-tier prefix activations per batch for ``tier``'s current state."""
        info = self.model.tiers.get(tier)
        compute = {n: p for n, p in info.params.items() if n in self.model.compute} if info else {}
        store = find_store(getattr(self.model, "host", None))
        stats = store.tiers.get(tier) if store is not None else None
        inputs = tuple(s.input_signature(tier) for s in self.model.strategies.values())
        key = (tier, json.dumps(compute, sort_keys=True, default=str), repr(inputs), id(stats))
        entry = self._tier_cached.get(key)
        if entry is None or entry[0] is not stats:
            while len(self._tier_cached) >= 4:  # bound memory: forget the oldest state
                self._tier_cached.popitem(last=False)
            entry = (stats, [None] * len(self.batches))
            self._tier_cached[key] = entry
        self._tier_cached.move_to_end(key)
        return entry[1]

    @torch.inference_mode()
    def logits(self, tier: str | None) -> torch.Tensor:
        """Scored outputs of every input at ``tier`` (``None``: the untouched model).

        The prefix runs inside the tier's run (it holds no wrapped module, so the tier cannot
        change it) on the input as the tier transforms it, and is kept for the next call.
        """
        active = self.executor.active(tier)
        prefix, suffix = self.prefix, self.suffix
        if active is not None and self.tier_prefix is not None:
            prefix, suffix = self.tier_prefix, self.tier_suffix
            prefixes = self._tier_prefixes(active)
        else:
            prefixes = self._prefixes(active) if self.prefix is not None else []
        outputs = []
        for index, batch in enumerate(self.batches):
            body = None
            if prefix is not None:

                def body(x: Any, index: int = index) -> Any:
                    if prefixes[index] is None:
                        prefixes[index] = _run(prefix, x, x)
                    return _run(suffix, prefixes[index], x)

            output = self.executor.run(active, batch, body=body)
            outputs.append(self.read(output, batch).float())
        return torch.cat(outputs)


class _Entry(NamedTuple):
    output: Any
    stats: Stats  # re-estimated BatchNorm statistics up to and including this stage
    flops: int  # FLOPs up to and including this stage (the FLOP-counting sample only)


FLOPS = "flops"  # the batch index of the one-sample input whose FLOPs are counted


class SettingRunner:
    """Outputs of fixed inputs at many compute settings, BatchNorm re-estimated per setting.

    Made for the compute search: a setting's activations after each stage of the model are
    cached under what the setting changes up to that stage, so a candidate one step from its
    parent reruns only the stages from its change on. The first batch is the *measuring* batch:
    it runs with every changed BatchNorm normalising by the batch's own statistics, which are
    recorded (:mod:`nnobfuscator.strategies.bn_reestimate`) and so reproduce that batch's outputs
    exactly in eval mode; the other batches then run in eval mode with them.

    Args:
        model: the tiered model.
        inputs: the calibration inputs.
        read: turns a model output and the inputs of its batch into the tensor that is scored
            (``Task.read``; default: the output's main tensor).
        batch_size: the measuring batch's size (and the others').
        budget_bytes: the most bytes of cached activations.
    """

    def __init__(
        self,
        model: Any,
        inputs: Any,
        read: Callable[[Any, Any], torch.Tensor] = lambda output, inputs: read_output(output),
        batch_size: int = 256,
        budget_bytes: int = 1 << 30,
    ) -> None:
        self.model, self.executor, self.read = model, model.executor, read
        count = count_samples(inputs)
        self.batches = [
            select(inputs, torch.arange(start, min(start + batch_size, count)))
            for start in range(0, count, batch_size)
        ]
        self.sample = select(inputs, torch.arange(1))
        stages = model_stages(model.base_model) if isinstance(inputs, torch.Tensor) else None
        self.staged = stages is not None
        self.stages: list[Stage] = stages or [("model", None)]
        self.store = find_store(getattr(model, "host", None))
        self.budget = budget_bytes
        self._cache: OrderedDict[tuple, _Entry] = OrderedDict()
        self._bytes = 0
        self._reference: Stats | None = None
        #: samples run through one stage, over all calls (divide by the split's size times the
        #: number of stages for equivalent full passes): a load-independent measure of work
        self.stage_samples = 0

    # --- signatures ------------------------------------------------------------------------
    def _stage_of(self, name: str) -> int | None:
        for index, (stage, _) in enumerate(self.stages):
            if self.staged and (name == stage or name.startswith(stage + ".")):
                return index
        return None  # the input, or a module no stage names: it changes everything

    def signatures(self, changes: dict[str, Any]) -> list[tuple]:
        """Per stage, what ``changes`` (module name -> change) alter up to that stage."""
        head: list[tuple[str, str]] = []
        per_stage: list[list[tuple[str, str]]] = [[] for _ in self.stages]
        for name, value in sorted(changes.items()):
            index = self._stage_of(name)
            entry = (name, json.dumps(value, sort_keys=True, default=str))
            (head if index is None else per_stage[index]).append(entry)
        prefix: list[tuple] = [tuple(head)]
        signatures = []
        for changed in per_stage:
            prefix.append(tuple(changed))
            signatures.append(tuple(prefix))
        return signatures

    # --- running ---------------------------------------------------------------------------
    def reference(self) -> Stats:
        """The untouched model's BatchNorm batch statistics on the measuring batch."""
        if self._reference is None:
            self._reference = {}
            if self.store is not None and self.store.norms:
                with torch.inference_mode(), self.store.measuring(None) as measurement:
                    self.executor.run(None, self.batches[0])
                self._reference = measurement.seen
        return self._reference

    def _keep(self, key: tuple, entry: _Entry) -> None:
        size = tensor_bytes(entry.output)
        self._cache[key] = entry
        self._bytes += size
        while self._bytes > self.budget and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= tensor_bytes(old.output)

    @torch.inference_mode()
    def _run(
        self, tier: str | None, signatures: list[tuple], index: int | str, measure: bool = False
    ) -> _Entry:
        batch = self.sample if index == FLOPS else self.batches[index]
        start = len(self.stages)
        while start > 0 and (index, signatures[start - 1]) not in self._cache:
            start -= 1
        previous = self._cache.get((index, signatures[start - 1])) if start else None
        if previous is not None:
            self._cache.move_to_end((index, signatures[start - 1]))
        base_stats = previous.stats if previous is not None else {}
        base_flops = previous.flops if previous is not None else 0
        result: list[_Entry] = []

        def body(*args: Any, **kwargs: Any) -> Any:
            if not self.staged:
                if previous is not None:
                    return previous.output
                x, flops = self._stage(
                    lambda: invoke(self.model.base_model, *args, **kwargs), index
                )
                entry = _Entry(x, self._found(base_stats, measurement), flops)
                self._keep((index, signatures[0]), entry)
                result.append(entry)
                return x
            inputs = args[0]
            x = inputs if previous is None else previous.output
            flops = base_flops
            stats = base_stats
            for position in range(start, len(self.stages)):
                name, stage = self.stages[position]
                x, spent = self._stage(partial(_run, [(name, stage)], x, inputs), index)
                flops += spent
                stats = self._found(stats, measurement)
                self.stage_samples += count_samples(inputs)
                self._keep((index, signatures[position]), _Entry(x, stats, flops))
            result.append(_Entry(x, stats, flops))
            return x

        measurement = None
        if measure and self.store is not None and self.store.norms:
            reference = self.reference()
            with self.store.measuring(reference) as measurement:
                output = self.executor.run(tier, batch, body=body)
        else:
            output = self.executor.run(tier, batch, body=body)
        entry = result[0] if result else _Entry(previous.output, base_stats, base_flops)
        return _Entry(output, entry.stats, entry.flops)

    @staticmethod
    def _found(stats: Stats, measurement: Any) -> Stats:
        if measurement is None or not measurement.found:
            return stats
        return {**stats, **measurement.found}

    @staticmethod
    def _stage(run: Callable[[], Any], index: int | str) -> tuple[Any, int]:
        if index != FLOPS:
            return run(), 0
        counter = FlopCounterMode(display=False)
        with counter:
            output = run()
        return output, int(counter.get_total_flops())

    def measure(self, tier: str | None, signatures: list[tuple]) -> tuple[torch.Tensor, Stats]:
        """Scored outputs of the measuring batch at ``tier``, and the statistics it measured."""
        entry = self._run(tier, signatures, 0, measure=True)
        return self.read(entry.output, self.batches[0]).float(), entry.stats

    def rest(self, tier: str | None, signatures: list[tuple]) -> list[torch.Tensor]:
        """Scored outputs of the other batches (run with the tier's installed statistics)."""
        return [
            self.read(self._run(tier, signatures, index).output, self.batches[index]).float()
            for index in range(1, len(self.batches))
        ]

    def flops(self, tier: str | None, signatures: list[tuple]) -> int:
        """FLOPs of one input at ``tier`` (stages shared with other settings counted once)."""
        return self._run(tier, signatures, FLOPS).flops
