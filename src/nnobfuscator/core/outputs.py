"""Batches in and out of a model, whatever their type: the one place that reads model outputs.

Inputs are an image batch (a tensor), a dict of equally long tensors (token ids and masks), a
list of strings (prompts) or a dict of prompts and per-sample seeds. Outputs are a tensor, torchvision's ``{"out": ..., "aux": ...}`` dict, a
Hugging Face ``ModelOutput`` (``.logits``, diffusers' ``.sample``) or a tuple of tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

MAIN_OUTPUT_KEYS = ("out", "logits", "sample", "images")
_PER_SAMPLE_ITEMS = (str, int, torch.Generator)


def batch_size(inputs: Any) -> int:
    """How many samples a batch holds.

    Raises:
        TypeError: the batch is of a type the core cannot split.
    """
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise TypeError("expected a batch with a leading sample dimension, got a scalar")
        return inputs.shape[0]
    if isinstance(inputs, Mapping) and inputs:
        sizes = {batch_size(v) for v in inputs.values() if _per_sample(v)}
        if len(sizes) == 1:
            return sizes.pop()
        raise TypeError(
            "a dict batch needs tensors (or lists of prompts) that all have the same first "
            "dimension"
        )
    if isinstance(inputs, list | tuple) and all(isinstance(v, str) for v in inputs):
        return len(inputs)
    raise TypeError(
        f"cannot batch inputs of type {type(inputs).__name__}: pass a tensor, a dict of tensors "
        "(e.g. input_ids, attention_mask), a list of prompts, or a dict of prompts and seeds"
    )


def _per_sample(value: Any) -> bool:
    """Whether a field of a dict batch holds one entry per sample (a tensor or a list)."""
    return (isinstance(value, torch.Tensor) and value.dim() > 0) or isinstance(value, list | tuple)


def select(inputs: Any, index: torch.Tensor) -> Any:
    """The samples at ``index`` (a 1-d long tensor) of a batch of any supported type."""
    if isinstance(inputs, torch.Tensor):
        return inputs.index_select(0, index.to(inputs.device))
    if isinstance(inputs, Mapping):
        return type(inputs)(
            **{k: select(v, index) if _per_sample(v) else v for k, v in inputs.items()}
        )
    if isinstance(inputs, list | tuple):
        return [inputs[i] for i in index.tolist()]
    raise TypeError(f"cannot select samples from {type(inputs).__name__}")


def read_output(output: Any) -> torch.Tensor:
    """The main tensor of a model output: logits, segmentation ``out``, a UNet's ``sample``.

    Raises:
        TypeError: no tensor can be found in the output.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in MAIN_OUTPUT_KEYS:
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
    for key in MAIN_OUTPUT_KEYS:
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot read a tensor from a model output of type {type(output).__name__}; return a "
        f"tensor, a dict or ModelOutput with one of {MAIN_OUTPUT_KEYS}, or a tuple of tensors"
    )


def read_images(output: Any) -> torch.Tensor:
    """Generated images as a float batch ``(N, C, H, W)`` in [0, 1], whatever the output type.

    Reads a pipeline output's ``images`` (diffusers' ``output_type`` ``"pil"``, ``"np"`` or
    ``"pt"``), or such images given directly.

    Raises:
        TypeError: no images can be found.
    """
    images = output
    if isinstance(output, Mapping) and "images" in output:
        images = output["images"]
    elif hasattr(output, "images"):
        images = output.images
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, np.ndarray):  # (N, H, W, C) floats in [0, 1]
        return torch.from_numpy(images).float().permute(0, 3, 1, 2)
    if isinstance(images, list | tuple) and images and hasattr(images[0], "convert"):
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    raise TypeError(
        f"cannot read images from a model output of type {type(output).__name__}: expected a "
        "pipeline output with .images (PIL images, a numpy array or a tensor)"
    )


def map_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every batch tensor of an output, keeping its type and other fields."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, Mapping):
        return _rebuild(output, {k: _map_field(v, fn) for k, v in output.items()})
    if isinstance(output, tuple | list):
        return type(output)(_map_field(v, fn) for v in output)
    raise TypeError(f"cannot transform a model output of type {type(output).__name__}")


def _map_field(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    return fn(value) if isinstance(value, torch.Tensor) and value.dim() else value


def _rebuild(template: Mapping, fields: dict[str, Any]) -> Any:
    """A mapping of ``template``'s type (dict, OrderedDict, ModelOutput) holding ``fields``.

    Output dataclasses list only their fields that are not ``None``; the others are given back
    as ``None`` (diffusers' ``nsfw_content_detected``).
    """
    if dataclasses.is_dataclass(template):
        fields = {f.name: fields.get(f.name) for f in dataclasses.fields(template)}
    try:
        return type(template)(**fields)
    except TypeError:
        return dict(fields)


def scatter(parts: Sequence[tuple[torch.Tensor, Any]], batch: int) -> Any:
    """Reassemble per-group outputs ``(row_index, output)`` into one output in batch order."""
    first = parts[0][1]
    if isinstance(first, torch.Tensor):
        out = first.new_empty((batch, *first.shape[1:]))
        for index, part in parts:
            out.index_copy_(0, index.to(out.device), part)
        return out
    if isinstance(first, Mapping):
        return _rebuild(first, {k: scatter([(i, p[k]) for i, p in parts], batch) for k in first})
    if isinstance(first, tuple | list) and all(isinstance(v, torch.Tensor) for v in first):
        items = [scatter([(i, p[j]) for i, p in parts], batch) for j in range(len(first))]
        return type(first)(items)
    if isinstance(first, np.ndarray):  # diffusers' output_type="np" images
        out_array = np.empty((batch, *first.shape[1:]), dtype=first.dtype)
        for index, part in parts:
            out_array[index.numpy()] = part
        return out_array
    if isinstance(first, list):  # one item per sample (e.g. generated PIL images)
        merged: list[Any] = [None] * batch
        for index, part in parts:
            for row, item in zip(index.tolist(), part, strict=True):
                merged[row] = item
        return merged
    if first is None:
        return None
    raise TypeError(f"cannot split a mixed batch over model outputs of type {type(first).__name__}")


def main_input(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The input that carries the batch: the first positional argument, else the first keyword."""
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    raise TypeError("the model was called without inputs")


def select_call(
    args: tuple, kwargs: dict[str, Any], index: torch.Tensor, batch: int
) -> tuple[tuple, dict[str, Any]]:
    """The samples at ``index`` of every per-sample argument of a call.

    Per-sample arguments are tensors whose first dimension is the batch size, dicts of them and
    lists of ``batch`` strings, seeds or random generators (one per image); everything else (a
    diffusion timestep, flags, a single generator) passes unchanged.
    """

    def pick(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return select(value, index) if value.dim() and value.shape[0] == batch else value
        if isinstance(value, Mapping):
            return type(value)(**{k: pick(v) for k, v in value.items()})
        if (
            isinstance(value, list | tuple)
            and len(value) == batch
            and value
            and all(isinstance(v, _PER_SAMPLE_ITEMS) for v in value)
        ):
            return select(value, index)
        return value

    return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}
