"""nnobfuscator: one trained model, a calibrated ladder of quality tiers.

Example:
    >>> from nnobfuscator import obfuscate, calibrate
    >>> tiered = obfuscate(model, tiers="free=60%,pro=85%,premium=full")
    >>> report = calibrate(tiered, calibration_split, test_split)
    >>> tiered(x, tier="free")                 # one tier for the batch
    >>> tiered(x, tiers=["free", "premium"])   # a tier per sample
"""

from __future__ import annotations

from typing import Any

from nnobfuscator.calibrate import CalibrationError, calibrate, evaluate
from nnobfuscator.data import Split
from nnobfuscator.model import InputSpec, ObfuscationConfig, TieredModel, obfuscate
from nnobfuscator.outputs import read_output
from nnobfuscator.report import plot_report, write_report
from nnobfuscator.serialization import ArtifactError
from nnobfuscator.strategies import (
    Strategy,
    get_strategy,
    list_strategies,
    register_block,
    register_strategy,
)
from nnobfuscator.tiers import Target, Tier, parse_tiers
from nnobfuscator.version import __version__
from nnobfuscator.wrapping import LayerAdapter, register_layer_adapter

__all__ = [
    "ArtifactError",
    "CalibrationError",
    "InputSpec",
    "LayerAdapter",
    "ObfuscationConfig",
    "Split",
    "Strategy",
    "Target",
    "Tier",
    "TieredModel",
    "__version__",
    "calibrate",
    "create_app",
    "evaluate",
    "get_strategy",
    "list_strategies",
    "obfuscate",
    "parse_tiers",
    "plot_report",
    "read_output",
    "register_block",
    "register_layer_adapter",
    "register_strategy",
    "write_report",
]


def __getattr__(name: str) -> Any:
    """``create_app`` is imported on use: ``import nnobfuscator`` never loads the HTTP stack."""
    if name == "create_app":
        from nnobfuscator.serving import create_app

        return create_app
    raise AttributeError(f"module 'nnobfuscator' has no attribute {name!r}")
