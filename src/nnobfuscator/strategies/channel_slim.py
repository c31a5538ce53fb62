"""Channel slim: a tier runs blocks with only their most important hidden channels.

Applies to every block a slimmer knows (``nnobfuscator.strategies.slimmers``: ResNet blocks,
transformer MLPs, plain conv stacks such as VGG's features). A tier keeping 50% of a stage runs
every block of that stage with half its hidden channels, as smaller layers (structured pruning
without retraining, chosen per tier). A conv stack's hidden spaces form one stage per spatial
resolution, named ``"<stack>@<level>"`` (``"features@2"``: after two downsamplings).
"""

from __future__ import annotations

from typing import Any

from nnobfuscator.core.wrapping import Host
from nnobfuscator.strategies.base import Strategy, register_strategy
from nnobfuscator.strategies.block_skip import matching
from nnobfuscator.strategies.blocks import (
    TieredBlock,
    collect_statistics,
    slimmable_blocks,
    stage_of,
    wrap_block,
)
from nnobfuscator.strategies.compute import ComputeStrategy, Setting
from nnobfuscator.strategies.conv_stack import ConvStackSlimmer
from nnobfuscator.strategies.options import StrategyConfig

KEEP_STEPS = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125, 0.0625)


@register_strategy
class ChannelSlim(ComputeStrategy):
    name = "channel-slim"
    description = "run blocks with fewer hidden channels at lower tiers (smaller layers)"

    def __init__(self, key: bytes, options: StrategyConfig | None = None) -> None:
        super().__init__(key, options)
        self.stage: dict[str, str] = {}
        #: blocks whose hidden spaces take shares of their own: per space, its stage
        self.space_stages: dict[str, list[str]] = {}

    def attach(self, host: Host) -> None:
        super().attach(host)
        names = matching(
            list(slimmable_blocks(host.root)), self.target_patterns, self.name, "slimmable blocks"
        )
        for name in names:
            wrapper = wrap_block(host, name)
            slimmer = wrapper.slimmer
            if isinstance(slimmer, ConvStackSlimmer):
                stages = [f"{name}@{level}" for level in slimmer.space_groups()]
                self.space_stages[name] = stages
                slimmer.space_keeps = lambda tier, stages=stages: self._keeps(tier, stages)
                wrapper.keep_rules[self.name] = lambda tier, stages=stages: min(
                    self._keeps(tier, stages)
                )
            else:
                self.stage[name] = stage_of(host.root, name, host)
                wrapper.keep_rules[self.name] = lambda tier, s=self.stage[name]: float(
                    self.setting(tier)["keep"].get(s, 1.0)
                )
            self.layers[name] = wrapper

    def pass_key(self, tier: str) -> Any:
        """``None`` (tiers of any width share a pass: a block runs once per width, on the
        samples of that width) in a model without BatchNorm to re-estimate, such as a language
        model; otherwise the setting (a slimmed block reads its tier's statistics, which one
        pass cannot give samples of several tiers)."""
        if not getattr(self, "norms", None) or not self.norms.norms:
            return None
        return Strategy.pass_key(self, tier)

    def _keeps(self, tier: str, stages: list[str]) -> tuple[float, ...]:
        keep = self.params(tier).get("keep", {})
        return tuple(float(keep.get(s, 1.0)) for s in stages)

    def detach(self) -> None:
        for wrapper in self.layers.values():
            if isinstance(wrapper, TieredBlock):
                wrapper.keep_rules.pop(self.name, None)
                if isinstance(wrapper.slimmer, ConvStackSlimmer):
                    wrapper.slimmer.space_keeps = None
        self.layers.clear()
        self.space_stages.clear()

    def slimmers(self) -> dict[str, Any]:
        return {n: w.slimmer for n, w in self.layers.items() if isinstance(w, TieredBlock)}

    def fit(self, run_clean: Any, batches: list[Any]) -> None:
        """Measure hidden activation statistics (channel ranking and fill values)."""
        collect_statistics(run_clean, self.slimmers(), batches)

    def state_tensors(self) -> dict[str, Any]:
        tensors = super().state_tensors()
        for name, slimmer in self.slimmers().items():
            for space, (mean, std) in enumerate(slimmer.stats or []):
                tensors[f"{self.name}/{name}/{space}/mean"] = mean
                tensors[f"{self.name}/{name}/{space}/std"] = std
        return tensors

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        super().load_state_tensors(tensors)
        for name, slimmer in self.slimmers().items():
            stats = []
            while f"{self.name}/{name}/{len(stats)}/mean" in tensors:
                prefix = f"{self.name}/{name}/{len(stats)}"
                stats.append((tensors[f"{prefix}/mean"].float(), tensors[f"{prefix}/std"].float()))
            if stats:
                slimmer.set_statistics(stats)

    @property
    def stages(self) -> list[str]:
        """The stages whose share of kept channels a setting chooses."""
        grouped = [s for stages in self.space_stages.values() for s in stages]
        return list(dict.fromkeys([*self.stage.values(), *grouped]))

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

    def changes(self, setting: Setting) -> dict[str, Any]:
        keep = setting["keep"]
        found: dict[str, Any] = {
            n: keep[s] for n, s in self.stage.items() if keep.get(s, 1.0) < 1.0
        }
        for name, stages in self.space_stages.items():
            shares = [keep.get(s, 1.0) for s in dict.fromkeys(stages)]
            if min(shares) < 1.0:
                found[name] = shares
        return found

    def covers(self, setting: Setting, other: Setting) -> bool:
        mine, theirs = setting["keep"], other["keep"]
        return all(mine.get(s, 1.0) <= theirs.get(s, 1.0) for s in self.stages)

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        keep = params.get("keep", {})
        if (
            not isinstance(keep, dict)
            or set(keep) - set(self.stages)
            or not all(isinstance(v, int | float) and 0.0 < v <= 1.0 for v in keep.values())
        ):
            raise ValueError(
                f"channel-slim: bad setting {params}; give {{'keep': {{stage: share in (0, 1]}}}} "
                f"for stages {self.stages}"
            )
        return {"keep": {k: float(v) for k, v in keep.items() if v < 1.0}}
