"""Block skip: a tier runs without some residual blocks (they return their input, unrun).

Only blocks whose shortcut is the identity can be skipped (torchvision ``BasicBlock`` and
``Bottleneck`` without ``downsample``). Which blocks a tier skips is chosen by calibration: the
cheapest set whose utility still clears the tier's target.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING

from nnobfuscator.strategies.base import register_strategy
from nnobfuscator.strategies.blocks import TieredBlock, is_skippable, residual_blocks
from nnobfuscator.strategies.compute import ComputeStrategy, Setting

if TYPE_CHECKING:
    from nnobfuscator.model import TieredModel


def matching_blocks(tiered: TieredModel, patterns: list[str] | None, strategy: str) -> list[str]:
    """Names of the residual blocks matching ``patterns`` (all of them when ``None``).

    Raises:
        ValueError: the model has no torchvision residual blocks, or none match.
    """
    blocks = list(residual_blocks(tiered.base_model))
    if not blocks:
        raise ValueError(
            f"{strategy} needs torchvision residual blocks (BasicBlock/Bottleneck, as in ResNet, "
            f"DeepLabV3, FCN); {type(tiered.base_model).__name__} has none. Drop {strategy} from "
            "the compute strategies"
        )
    names = [
        n
        for n in blocks
        if patterns is None or any(fnmatch.fnmatchcase(n, pattern) for pattern in patterns)
    ]
    if not names:
        raise ValueError(f"{strategy}: patterns {patterns} match no block; blocks: {blocks[:8]}")
    return names


@register_strategy
class BlockSkip(ComputeStrategy):
    name = "block-skip"
    description = "skip residual blocks at lower tiers (skipped blocks never run)"

    def attach(self, tiered: TieredModel) -> None:
        for name in matching_blocks(tiered, self.target_patterns, self.name):
            wrapper = tiered.wrap_block(name)
            if is_skippable(wrapper.base_block):
                self.layers[name] = wrapper

    def detach(self) -> None:
        for wrapper in self.layers.values():
            wrapper.skip.clear()
        self.layers.clear()

    def default_setting(self) -> Setting:
        return {"skip": []}

    def cheaper(self, setting: Setting) -> list[Setting]:
        skipped = set(setting["skip"])
        return [{"skip": sorted(skipped | {name})} for name in self.layers if name not in skipped]

    def apply_setting(self, tier: str, setting: Setting) -> None:
        unknown = set(setting.get("skip", [])) - set(self.layers)
        if unknown:
            raise ValueError(
                f"block-skip: {sorted(unknown)} are not skippable blocks of this model; "
                f"skippable: {sorted(self.layers)}"
            )
        for name, wrapper in self.layers.items():
            block: TieredBlock = wrapper
            if name in setting["skip"]:
                block.skip.add(tier)
            else:
                block.skip.discard(tier)
