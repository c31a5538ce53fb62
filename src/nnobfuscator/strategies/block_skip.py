"""Block skip: a tier runs without some residual blocks (they return their input, unrun).

Any block registered in :mod:`nnobfuscator.strategies.blocks` whose shortcut is the identity can be
skipped (torchvision's ResNet, MobileNet, EfficientNet, MNASNet, ConvNeXt, RegNet, ViT and Swin
blocks out of the box). Which blocks a tier skips is chosen by calibration: the cheapest set whose
utility still clears the tier's target. Tiers that differ only in the blocks they skip share a
forward pass: each block runs on the samples whose tier keeps it.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch

from nnobfuscator.core.wrapping import Host
from nnobfuscator.strategies.base import register_strategy
from nnobfuscator.strategies.blocks import TieredBlock, skippable_blocks, wrap_block
from nnobfuscator.strategies.compute import ComputeStrategy, Setting


def matching(names: list[str], patterns: list[str] | None, strategy: str, what: str) -> list[str]:
    """``names`` matching ``patterns`` (all of them when ``None``).

    Raises:
        ValueError: there are no ``names``, or none match.
    """
    if not names:
        raise ValueError(
            f"{strategy} found no {what} in this model; register its block type with "
            "nnobfuscator.strategies.blocks.register_block, or drop it from the compute strategies"
        )
    chosen = [
        n for n in names if patterns is None or any(fnmatch.fnmatchcase(n, p) for p in patterns)
    ]
    if not chosen:
        raise ValueError(f"{strategy}: patterns {patterns} match no {what}; some: {names[:8]}")
    return chosen


@register_strategy
class BlockSkip(ComputeStrategy):
    name = "block-skip"
    description = "skip residual blocks at lower tiers (skipped blocks never run)"
    #: a pass mixing tiers runs each block only on the samples whose tier keeps it
    shares_passes = True

    def attach(self, host: Host) -> None:
        super().attach(host)
        names = matching(
            list(skippable_blocks(host.root)),
            self.target_patterns,
            self.name,
            "skippable residual blocks",
        )
        for name in names:
            wrapper = wrap_block(host, name)
            wrapper.skip_rules[self.name] = lambda tier, name=name: (
                name in self.setting(tier)["skip"]
            )
            self.layers[name] = wrapper

    def detach(self) -> None:
        for wrapper in self.layers.values():
            if isinstance(wrapper, TieredBlock):
                wrapper.skip_rules.pop(self.name, None)
        self.layers.clear()

    def default_setting(self) -> Setting:
        return {"skip": []}

    def cheaper(self, setting: Setting) -> list[Setting]:
        skipped = set(setting["skip"])
        return [{"skip": sorted(skipped | {name})} for name in self.layers if name not in skipped]

    def changes(self, setting: Setting) -> dict[str, Any]:
        return {name: "skip" for name in setting["skip"]}

    def covers(self, setting: Setting, other: Setting) -> bool:
        return set(setting["skip"]) >= set(other["skip"])

    def sealed_state(self, tier: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Zero every tensor of the skipped blocks (running variances 1): a residual block whose
        branch computes zero returns its input, so the plain model skips it and the shipped file
        holds nothing of it. The zeroed tensors are listed as ``withheld``."""
        withheld = []
        for block in self.setting(tier)["skip"]:
            for key in [k for k in state if k.startswith(block + ".")]:
                fill = 1.0 if key.endswith("running_var") else 0.0
                state[key] = torch.full_like(state[key], fill)
                withheld.append(key)
        return {"withheld": withheld} if withheld else {}

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        skip = params.get("skip", [])
        unknown = set(skip) - set(self.layers) if isinstance(skip, list) else {repr(skip)}
        if unknown:
            raise ValueError(
                f"block-skip: {sorted(unknown)} are not skippable blocks of this model; "
                f"skippable: {sorted(self.layers)}"
            )
        return {"skip": sorted(skip)}
