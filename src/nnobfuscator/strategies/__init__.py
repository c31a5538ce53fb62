"""Obfuscation strategies and their registry."""

from nnobfuscator.strategies.aim_noise import AimNoise
from nnobfuscator.strategies.base import (
    Strategy,
    get_strategy,
    list_strategies,
    register_default_targets,
    register_strategy,
    resolve_targets,
    strategy_config,
)
from nnobfuscator.strategies.block_skip import BlockSkip
from nnobfuscator.strategies.blocks import TieredBlock, register_block
from nnobfuscator.strategies.channel_slim import ChannelSlim
from nnobfuscator.strategies.class_merge import ClassMerge
from nnobfuscator.strategies.compute import ComputeStrategy
from nnobfuscator.strategies.denoising import FewerSteps, GuidanceCutoff
from nnobfuscator.strategies.feature_mix import FeatureMix, FeatureMixConfig
from nnobfuscator.strategies.input_resolution import InputResolution
from nnobfuscator.strategies.logit_noise import LogitNoise
from nnobfuscator.strategies.options import StrategyConfig
from nnobfuscator.strategies.weight_noise import WeightNoise

__all__ = [
    "AimNoise",
    "BlockSkip",
    "ChannelSlim",
    "ClassMerge",
    "ComputeStrategy",
    "FeatureMix",
    "FeatureMixConfig",
    "FewerSteps",
    "GuidanceCutoff",
    "InputResolution",
    "LogitNoise",
    "Strategy",
    "StrategyConfig",
    "TieredBlock",
    "WeightNoise",
    "get_strategy",
    "list_strategies",
    "register_block",
    "register_default_targets",
    "register_strategy",
    "resolve_targets",
    "strategy_config",
]
