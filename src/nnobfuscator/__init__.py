"""nnobfuscator: one trained model, a calibrated ladder of quality tiers.

Example:
    >>> from nnobfuscator import obfuscate, calibrate
    >>> tiered = obfuscate(model, tiers="free=60%,pro=85%,premium=full")
    >>> report = calibrate(tiered, calibration_split, test_split)
    >>> tiered(x, tier="free")                 # one tier for the batch
    >>> tiered(x, tiers=["free", "premium"])   # a tier per sample

Public names are imported on first use (PEP 562), so ``import nnobfuscator`` and light
commands such as ``nnobf keys ...`` never load torch. Registries fill up as before: a
strategy, block or layer adapter registers when its module is imported, and building a model
imports them all (``nnobfuscator.model`` pulls in ``strategies``, ``wrapping`` and ``diffusion``).
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

from nnobfuscator.version import __version__

if TYPE_CHECKING:
    from nnobfuscator.calibrate import CalibrationError, calibrate, evaluate
    from nnobfuscator.data import Split
    from nnobfuscator.model import InputSpec, ObfuscationConfig, TieredModel, obfuscate
    from nnobfuscator.outputs import read_output
    from nnobfuscator.report import plot_report, write_report
    from nnobfuscator.serialization import ArtifactError
    from nnobfuscator.serving import create_app
    from nnobfuscator.strategies import (
        Strategy,
        get_strategy,
        list_strategies,
        register_block,
        register_strategy,
    )
    from nnobfuscator.tiers import Target, Tier, parse_tiers
    from nnobfuscator.wrapping import LayerAdapter, register_layer_adapter

#: public name -> the module it comes from
_EXPORTS = {
    "ArtifactError": "nnobfuscator.serialization",
    "CalibrationError": "nnobfuscator.calibrate",
    "InputSpec": "nnobfuscator.model",
    "LayerAdapter": "nnobfuscator.wrapping",
    "ObfuscationConfig": "nnobfuscator.model",
    "Split": "nnobfuscator.data",
    "Strategy": "nnobfuscator.strategies",
    "Target": "nnobfuscator.tiers",
    "Tier": "nnobfuscator.tiers",
    "TieredModel": "nnobfuscator.model",
    "calibrate": "nnobfuscator.calibrate",
    "create_app": "nnobfuscator.serving",
    "evaluate": "nnobfuscator.calibrate",
    "get_strategy": "nnobfuscator.strategies",
    "list_strategies": "nnobfuscator.strategies",
    "obfuscate": "nnobfuscator.model",
    "parse_tiers": "nnobfuscator.tiers",
    "plot_report": "nnobfuscator.report",
    "read_output": "nnobfuscator.outputs",
    "register_block": "nnobfuscator.strategies",
    "register_layer_adapter": "nnobfuscator.wrapping",
    "register_strategy": "nnobfuscator.strategies",
    "write_report": "nnobfuscator.report",
}

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
    """Import a public name's module on first use and cache the name in this module."""
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'nnobfuscator' has no attribute {name!r}")
    value = getattr(import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """Keeps a public name bound to the function, not to the submodule of the same name.

    Importing ``nnobfuscator.calibrate`` (the module) binds it as the package attribute
    ``calibrate``, which would hide the function ``calibrate`` from ``from nnobfuscator import
    calibrate``. As with the former eager imports, the function wins.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            isinstance(value, types.ModuleType)
            and _EXPORTS.get(name) == value.__name__ == f"{__name__}.{name}"
            and hasattr(value, name)
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
