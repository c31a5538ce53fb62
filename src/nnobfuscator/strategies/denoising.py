"""Compute strategies for diffusion pipelines: fewer denoising steps, guidance cut off early.

Both change the pipeline *call* of a tier (:meth:`~nnobfuscator.strategies.Strategy.transform_call`)
and need a model that knows its call options (a :class:`~nnobfuscator.core.diffusion.PipelineModule`).

- ``fewer-steps``: a tier runs a share of the call's ``num_inference_steps``.
- ``guidance-cutoff``: classifier-free guidance doubles the UNet batch; a tier keeps it for the
  first share of the steps only, then denoises with the text-conditioned half (the technique of
  diffusers' ``SDCFGCutoffCallback``, here per image of a batch). Share 0 turns guidance off.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from nnobfuscator.core.diffusion import PipelineModule
from nnobfuscator.core.layer_adapters import layer_adapter
from nnobfuscator.core.wrapping import Host, TieredLayer, unwrapped_name
from nnobfuscator.strategies.base import register_default_targets, register_strategy
from nnobfuscator.strategies.compute import ComputeStrategy, Setting

STEP_SHARES = (1.0, 0.75, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)
GUIDANCE_SHARES = (1.0, 0.75, 0.5, 0.25, 0.0)

Call = tuple[tuple, dict[str, Any]]


class _CallStrategy(ComputeStrategy):
    """A compute strategy whose setting is one share in ``shares`` (1.0 saves nothing)."""

    shares: tuple[float, ...] = (1.0,)

    def attach(self, host: Host) -> None:
        if not callable(getattr(host.root, "option", None)):
            raise ValueError(
                f"{self.name} works on diffusion pipelines (obfuscate a diffusers pipeline); "
                f"{type(host.root).__name__} has no pipeline call options"
            )
        self.host = host

    def default_setting(self) -> Setting:
        return {"share": 1.0}

    def cheaper(self, setting: Setting) -> list[Setting]:
        lower = [share for share in self.shares if share < setting["share"]]
        return [{"share": max(lower)}] if lower else []

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        share = params.get("share")
        low = min(self.shares)
        if not isinstance(share, int | float) or not low <= share <= 1.0:
            raise ValueError(f"{self.name}: share must lie in [{low}, 1], got {share!r}")
        return {"share": float(share)}

    def share(self, tier: str) -> float:
        return float(self.setting(tier)["share"])

    def option(self, kwargs: dict[str, Any], name: str) -> Any:
        """The value of call option ``name`` for this call (the call's, else the model's)."""
        value = kwargs.get(name)
        return value if value is not None else self.host.root.option(name)

    def resolved_targets(self) -> list[str]:
        return ["<call>"]


@register_strategy
class FewerSteps(_CallStrategy):
    name = "fewer-steps"
    description = "run a share of the denoising steps at lower tiers (diffusion pipelines)"
    shares = STEP_SHARES

    def transform_call(self, args: tuple, kwargs: dict[str, Any], tier: str) -> Call:
        share = self.share(tier)
        if share >= 1.0:
            return args, kwargs
        steps = int(self.option(kwargs, "num_inference_steps"))
        return args, {**kwargs, "num_inference_steps": max(1, round(share * steps))}


@register_strategy
class GuidanceCutoff(_CallStrategy):
    name = "guidance-cutoff"
    description = (
        "classifier-free guidance for the first share of the steps only (diffusion pipelines)"
    )
    shares = GUIDANCE_SHARES

    def transform_call(self, args: tuple, kwargs: dict[str, Any], tier: str) -> Call:
        share = self.share(tier)
        scale = self.option(kwargs, "guidance_scale")
        if share >= 1.0 or scale is None or scale <= 1.0:
            return args, kwargs  # no guidance to cut
        if share <= 0.0:
            return args, {**kwargs, "guidance_scale": 1.0}
        user = kwargs.get("callback_on_step_end")
        inputs = list(
            getattr(user, "tensor_inputs", None)
            or kwargs.get("callback_on_step_end_tensor_inputs")
            or ["latents"]
        )
        return args, {
            **kwargs,
            "callback_on_step_end": _guidance_cutoff(share, user),
            "callback_on_step_end_tensor_inputs": sorted({*inputs, "prompt_embeds"}),
        }


def _guidance_cutoff(share: float, user: Callable[..., Any] | None) -> Callable[..., Any]:
    """A step-end callback that stops guidance after ``share`` of the steps (then ``user``'s)."""

    def callback(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict:
        guided = max(1, math.ceil(share * pipeline.num_timesteps))
        if step == guided - 1 and pipeline.do_classifier_free_guidance:
            # Batched as [unconditional; conditional]: keep the conditional half of every image.
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[1]
            pipeline._guidance_scale = 1.0  # as diffusers' SDCFGCutoffCallback does
        return user(pipeline, step, timestep, tensors) if user is not None else tensors

    return callback


def text_conditioned_layers(model: nn.Module) -> list[str]:
    """The key and value projections of every cross-attention: the layers that read the text.

    Mixing their input features is mixing the text-embedding channels the image model sees, so a
    tier's prompt adherence falls smoothly with the strength while the image stays an image.
    """
    found = []
    for name, module in model.named_modules():
        if not getattr(module, "is_cross_attention", False):
            continue
        for child in ("to_k", "to_v"):
            layer = getattr(module, child, None)
            if isinstance(layer, TieredLayer) or (
                isinstance(layer, nn.Module) and layer_adapter(layer) is not None
            ):
                found.append(unwrapped_name(f"{name}.{child}"))
    return found


register_default_targets(PipelineModule, text_conditioned_layers)
