"""Input resolution: a tier sees a downscaled input (fewer pixels, fewer FLOPs everywhere).

For models that accept other input sizes (fully-convolutional models, global pooling before the
classifier). Models with a fixed input size (e.g. a ViT's position embeddings) fail at a smaller
size; calibration then leaves this strategy at full scale. Dense outputs (``(N, C, h, w)`` maps
such as segmentation logits) are scaled back to the input's size, so callers see the same output
shape at every tier.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from nnobfuscator.core.outputs import map_output
from nnobfuscator.strategies.base import register_strategy
from nnobfuscator.strategies.compute import ComputeStrategy, Setting

SCALE_STEPS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375)


def resize_input(inputs: Any, scale: float) -> Any:
    """An image batch ``(N, C, H, W)`` downscaled by ``scale`` as a tier sees it (bilinear,
    antialiased; sides rounded); ``scale`` 1 returns it as it is."""
    if scale == 1.0:
        return inputs
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise ValueError("input-resolution needs image batches (N, C, H, W)")
    size = [max(1, round(side * scale)) for side in inputs.shape[-2:]]
    return F.interpolate(inputs, size=size, mode="bilinear", antialias=True)


@register_strategy
class InputResolution(ComputeStrategy):
    name = "input-resolution"
    description = "downscale the image input at lower tiers (models that take other sizes)"

    def default_setting(self) -> Setting:
        return {"scale": 1.0}

    def cheaper(self, setting: Setting) -> list[Setting]:
        """Every smaller scale: one jump can reach a resolution that loses nothing (an input
        upscaled from a smaller native size), which small steps through worse ones would miss."""
        return [{"scale": step} for step in SCALE_STEPS if step < setting["scale"]]

    def covers(self, setting: Setting, other: Setting) -> bool:
        return setting["scale"] <= other["scale"]

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        scale = params.get("scale")
        if not isinstance(scale, int | float) or not 0.0 < scale <= 1.0:
            raise ValueError(f"input-resolution: scale must lie in (0, 1], got {scale!r}")
        return {"scale": float(scale)}

    def sealed_state(self, tier: str, state: dict[str, Any]) -> dict[str, Any]:
        """Weights cannot shrink an input: the manifest records the scale the tier runs at
        (callers resize the input before the plain model)."""
        return {"input_scale": self.scale(tier)} if self.is_active(tier) else {}

    def scale(self, tier: str) -> float:
        return float(self.setting(tier)["scale"])

    def input_signature(self, tier: str) -> Any:
        scale = self.scale(tier)
        return None if scale == 1.0 else scale

    def transform_input(self, inputs: Any, tier: str) -> Any:
        return resize_input(inputs, self.scale(tier))

    def transform_output(self, output: Any, inputs: Any, tier: str) -> Any:
        if self.scale(tier) == 1.0:
            return output
        size = tuple(inputs.shape[-2:])

        def restore(logits: torch.Tensor) -> torch.Tensor:
            if logits.dim() != 4 or tuple(logits.shape[-2:]) == size:
                return logits
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

        return map_output(output, restore)

    def resolved_targets(self) -> list[str]:
        return ["<input>"]
