"""Obfuscation strategies and their registry."""

from nnobfuscator.strategies.base import (
    Strategy,
    TierContext,
    TieredLayer,
    get_strategy,
    list_strategies,
    register_strategy,
    resolve_targets,
)
from nnobfuscator.strategies.feature_mix import FeatureMix
from nnobfuscator.strategies.logit_noise import LogitNoise
from nnobfuscator.strategies.weight_noise import WeightNoise

__all__ = [
    "FeatureMix",
    "LogitNoise",
    "Strategy",
    "TierContext",
    "TieredLayer",
    "WeightNoise",
    "get_strategy",
    "list_strategies",
    "register_strategy",
    "resolve_targets",
]
