"""Diffusion pipelines as tiered models: a pipeline's modules seen as one ``nn.Module``.

A diffusers pipeline (``StableDiffusionPipeline`` and the like) is not an ``nn.Module``: it is a
set of modules (UNet, text encoder, VAE) and a sampling loop. :class:`PipelineModule` holds the
pipeline's own modules as children (the same objects: wrapping a layer changes the user's
pipeline in place, and ``unload`` undoes it) and runs the pipeline when called, so the core tiers
it like any model. Nothing here imports diffusers; a pipeline is recognised by its structure (a
callable with a ``components`` dict holding modules).

Per-sample seeds make an image depend only on its prompt, seed and tier, never on the rest of the
batch: ``model({"prompt": [...], "seed": tensor}, tiers=[...])``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: compute strategies ``compute="auto"`` takes for a pipeline
PIPELINE_COMPUTE = ("fewer-steps", "guidance-cutoff")


def is_pipeline(model: Any) -> bool:
    """Whether ``model`` looks like a diffusers pipeline: callable, with modules as components."""
    components = getattr(model, "components", None)
    return (
        not isinstance(model, nn.Module)
        and callable(model)
        and isinstance(components, dict)
        and any(isinstance(c, nn.Module) for c in components.values())
    )


def as_module(model: Any, call_options: dict[str, Any] | None = None) -> nn.Module:
    """``model`` itself when it is an ``nn.Module``, a :class:`PipelineModule` for a pipeline.

    Raises:
        TypeError: neither.
    """
    if isinstance(model, nn.Module):
        return model
    if is_pipeline(model):
        return PipelineModule(model, call_options)
    raise TypeError(
        f"cannot tier a {type(model).__name__}: pass a torch nn.Module or a diffusers pipeline "
        "(e.g. StableDiffusionPipeline)"
    )


def seed_generators(seed: Any, count: int) -> list[torch.Generator]:
    """One CPU generator per image: ``seed`` is an int (the same for all) or one per image.

    CPU generators draw the same starting noise on any device, so an image does not depend on
    where it is made.
    """
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(-1).tolist()
    seeds = [int(seed)] * count if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} prompts: give one per prompt")
    return [torch.Generator().manual_seed(s) for s in seeds]


class PipelineModule(nn.Module):
    """A diffusion pipeline as one module: its modules are children, calling it runs it.

    Args:
        pipeline: the user's pipeline (kept as ``pipeline``, not copied).
        call_options: options every call gets unless it passes its own (the full tier's
            ``num_inference_steps``, ``guidance_scale``, ``height``...).

    Example:
        >>> module = PipelineModule(pipe, {"num_inference_steps": 20})
        >>> images = module(["a handwritten digit seven"], seed=[0]).images
    """

    def __init__(self, pipeline: Any, call_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.__dict__["pipeline"] = pipeline  # not a child: its modules are
        self.call_options = dict(call_options or {})
        for name, component in pipeline.components.items():
            if isinstance(component, nn.Module):
                self.add_module(name, component)

    def option(self, name: str) -> Any:
        """A call option's value when a call does not pass it (``call_options``, else the
        pipeline's own default)."""
        if name in self.call_options:
            return self.call_options[name]
        parameter = inspect.signature(self.pipeline.__call__).parameters.get(name)
        return None if parameter is None else parameter.default

    def forward(self, prompt: str | Sequence[str], seed: Any = None, **kwargs: Any) -> Any:
        """Run the pipeline on ``prompt`` with ``call_options`` under the call's own options.

        Args:
            seed: an int, or one per prompt (a list or tensor); sets per-image generators.
        """
        options = {**self.call_options, **kwargs}
        if seed is not None:
            if options.get("generator") is not None:
                raise ValueError("pass seed= or generator=, not both")
            count = 1 if isinstance(prompt, str) else len(prompt)
            options["generator"] = seed_generators(seed, count)
        return self.pipeline(prompt, **options)
