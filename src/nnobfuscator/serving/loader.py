"""Rebuild a served model from an artifact directory, and read how its inputs are prepared."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnobfuscator.model import TieredModel
from nnobfuscator.serving.images import ImageSpec
from nnobfuscator.sources import IMAGENET_MEAN, IMAGENET_STD, class_names
from nnobfuscator.zoo.datasets import ZOO_DATASETS


@dataclass
class ServedModel:
    """A tiered model plus what the server needs to feed it and read its answers.

    Args:
        model: the tiered model (eval mode).
        image_spec: how an uploaded image becomes one input (image tasks).
        labels: class names by index (classification, segmentation), or ``None``.
    """

    model: TieredModel
    image_spec: ImageSpec
    labels: list[str] | None = None

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def takes_seed(self) -> bool:
        """Whether the model draws from a seed per sample (a diffusion pipeline)."""
        forward = getattr(self.model.base_model, "forward", None)
        return forward is not None and "seed" in inspect.signature(forward).parameters

    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return str(index)


def load_artifact(directory: str | Path) -> ServedModel:
    """Load an artifact the way ``nnobf eval`` does: base model from its stored source, then tiers.

    Raises:
        ValueError: the artifact is missing or corrupt, or does not record its model source.
    """
    from nnobfuscator.serialization import read_config
    from nnobfuscator.sources import load_base_model

    config = read_config(directory)
    source = config.get("meta", {}).get("source")
    if not source or "model" not in source:
        raise ValueError(
            f"{directory} does not record where its base model comes from; build the app in "
            "Python instead: create_app(TieredModel.from_pretrained(dir, model))"
        )
    base, _ = load_base_model(source["model"], progress=False)
    model = TieredModel.from_pretrained(str(directory), base)
    return serve_model(model)


def serve_model(model: TieredModel, *, labels: list[str] | None = None) -> ServedModel:
    """Wrap an in-memory tiered model for serving (puts it in eval mode)."""
    model.eval()
    data = dict(model.meta.get("source", {}).get("data", {}))
    data.update(model.meta.get("serving", {}))
    return ServedModel(model, image_spec(model, data), labels or class_labels(model.meta, data))


def image_spec(model: TieredModel, data: dict[str, Any]) -> ImageSpec:
    """Preprocessing that matches how the artifact's data was prepared for calibration."""
    spec = model.input_spec
    size = None
    if spec is not None and spec.height and spec.width:
        size = (spec.height, spec.width)
    elif data.get("image_size"):
        size = (int(data["image_size"]), int(data["image_size"]))
    channels = (spec.channels if spec else None) or (1 if data.get("grayscale") else 3)
    zoo = ZOO_DATASETS.get(data.get("zoo") or "")
    if zoo is not None:
        # The zoo's images are stretched to size and normalised with their own statistics.
        return ImageSpec(channels, size, (zoo.mean,), (zoo.std,), crop=False)
    mean = tuple(data.get("mean", IMAGENET_MEAN))
    std = tuple(data.get("std", IMAGENET_STD))
    if channels == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return ImageSpec(channels, size, mean, std, crop=model.task == "classification")


def class_labels(meta: dict[str, Any], data: dict[str, Any]) -> list[str] | None:
    """Class names: ``meta["classes"]``, else those of the data source (zoo or ImageFolder)."""
    if meta.get("classes"):
        return [str(name) for name in meta["classes"]]
    return class_names(data)
