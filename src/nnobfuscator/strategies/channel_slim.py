"""Channel slim: a tier runs residual blocks with only their most important inner channels.

Within each block, inner channels are ranked by |BN scale| times the L1 norm of the weights that
read them; a tier keeping 50% of a stage runs every block of that stage with half its inner
channels, as smaller convolutions (structured pruning without retraining, chosen per tier).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nnobfuscator.strategies.base import register_strategy
from nnobfuscator.strategies.block_skip import matching_blocks
from nnobfuscator.strategies.blocks import collect_block_statistics, stage_of
from nnobfuscator.strategies.compute import ComputeStrategy, Setting

if TYPE_CHECKING:
    from nnobfuscator.model import TieredModel

KEEP_STEPS = (1.0, 0.75, 0.5, 0.25, 0.125)


@register_strategy
class ChannelSlim(ComputeStrategy):
    name = "channel-slim"
    description = "run residual blocks with fewer inner channels at lower tiers (smaller convs)"

    def attach(self, tiered: TieredModel) -> None:
        for name in matching_blocks(tiered, self.target_patterns, self.name):
            self.layers[name] = tiered.wrap_block(name)

    def detach(self) -> None:
        for wrapper in self.layers.values():
            for tier in list(wrapper.keep):
                wrapper.set_keep(tier, 1.0)
        self.layers.clear()

    def fit(self, tiered: TieredModel, batches: list[torch.Tensor]) -> None:
        """Measure inner activation statistics (channel ranking and fill values)."""
        with tiered.context.activate(None):
            collect_block_statistics(tiered.base_model, self.layers, batches)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, wrapper in self.layers.items():
            for space, (mean, std) in enumerate(wrapper.stats or []):
                tensors[f"{self.name}/{name}/{space}/mean"] = mean
                tensors[f"{self.name}/{name}/{space}/std"] = std
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, wrapper in self.layers.items():
            stats = []
            while f"{self.name}/{name}/{len(stats)}/mean" in tensors:
                prefix = f"{self.name}/{name}/{len(stats)}"
                stats.append((tensors[f"{prefix}/mean"].float(), tensors[f"{prefix}/std"].float()))
            if stats:
                wrapper.set_statistics(stats)

    @property
    def stages(self) -> list[str]:
        """The stages (``layer3``, ...) whose share of kept channels a setting chooses."""
        return list(dict.fromkeys(stage_of(name) for name in self.layers))

    def default_setting(self) -> Setting:
        return {"keep": {}}

    def cheaper(self, setting: Setting) -> list[Setting]:
        options = []
        for stage in self.stages:
            keep = setting["keep"].get(stage, 1.0)
            lower = [step for step in KEEP_STEPS if step < keep]
            if lower:
                options.append({"keep": {**setting["keep"], stage: max(lower)}})
        return options

    def apply_setting(self, tier: str, setting: Setting) -> None:
        keep = setting.get("keep", {})
        unknown = set(keep) - set(self.stages)
        if unknown or not all(0.0 < float(v) <= 1.0 for v in keep.values()):
            raise ValueError(
                f"channel-slim: bad setting {setting}; give {{'keep': {{stage: share in (0, 1]}}}} "
                f"for stages {self.stages}"
            )
        for name, wrapper in self.layers.items():
            wrapper.set_keep(tier, float(keep.get(stage_of(name), 1.0)))
