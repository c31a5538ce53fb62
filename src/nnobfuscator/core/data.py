"""Labelled splits held in memory, and the conversions the core accepts for them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nnobfuscator.core.outputs import batch_size, select


@dataclass
class Split:
    """A labelled split held in memory.

    Args:
        name: ``"calibration"``, ``"test"``, ...
        inputs: what the model takes: an image batch ``(N, C, H, W)``, a dict of equally long
            tensors (``{"input_ids": ..., "attention_mask": ...}``) or a list of prompts.
        labels: class indices ``(N,)`` or per-pixel classes ``(N, H, W)``.
    """

    name: str
    inputs: Any
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> Any:
        """The inputs (an alias kept for image tasks)."""
        return self.inputs

    def head(self, count: int) -> Any:
        """The first ``count`` inputs."""
        return select(self.inputs, torch.arange(min(count, len(self))))


DataLike = Split | tuple[Any, torch.Tensor] | torch.utils.data.Dataset


def as_split(data: DataLike, name: str) -> Split:
    """Hold a labelled split in memory (a ``Split``, an ``(inputs, labels)`` pair or a Dataset).

    Raises:
        TypeError: something else was given.
        ValueError: an empty split, or inputs and labels of different lengths.
    """
    if isinstance(data, Split):
        split = data
    elif isinstance(data, tuple) and len(data) == 2:
        inputs, labels = data
        split = Split(name, _as_inputs(inputs), torch.as_tensor(labels).long())
    else:
        try:
            pairs = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"{name} data must be a Split, an (inputs, labels) pair or a map-style Dataset"
            ) from None
        inputs = torch.stack([torch.as_tensor(p[0]) for p in pairs]) if pairs else torch.empty(0)
        split = Split(name, inputs.float(), torch.as_tensor([int(p[1]) for p in pairs]).long())
    if len(split) == 0:
        raise ValueError(f"the {name} split is empty")
    if batch_size(split.inputs) != len(split):
        raise ValueError(f"{name}: {batch_size(split.inputs)} inputs but {len(split)} labels")
    return split


def _as_inputs(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.float() if inputs.is_floating_point() else inputs
    if isinstance(inputs, Mapping) or (
        isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], str)
    ):
        return inputs
    return torch.as_tensor(inputs).float()
