"""nnobfuscator: one trained model, a calibrated ladder of quality tiers.

Example:
    >>> from nnobfuscator import obfuscate, calibrate
    >>> tiered = obfuscate(model, tiers="free=60%,pro=85%,premium=full")
    >>> report = calibrate(tiered, calibration_split, test_split)
    >>> tiered(x, tier="free")                 # one tier for the batch
    >>> tiered(x, tiers=["free", "premium"])   # a tier per sample
"""

from nnobfuscator.calibrate import CalibrationError, calibrate, evaluate
from nnobfuscator.model import InputSpec, ObfuscationConfig, TieredModel, obfuscate
from nnobfuscator.report import plot_report, write_report
from nnobfuscator.serialization import ArtifactError
from nnobfuscator.serving import create_app
from nnobfuscator.strategies import Strategy, get_strategy, list_strategies, register_strategy
from nnobfuscator.tiers import Target, Tier, parse_tiers
from nnobfuscator.version import __version__

__all__ = [
    "ArtifactError",
    "CalibrationError",
    "InputSpec",
    "ObfuscationConfig",
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
    "register_strategy",
    "write_report",
]
