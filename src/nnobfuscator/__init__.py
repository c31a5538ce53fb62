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
imports them all (``nnobfuscator.tiered.model`` pulls in ``strategies`` and ``wrapping``).

Layout, each layer importing only those below it (docs/layout.md): ``core`` (tiers, wrapping,
artifacts, outputs, the secret key), ``strategies``, ``tiered`` (the tiered model, ``obfuscate``,
the executor), ``tasks``, ``extraction`` and ``zoo`` (demo models and data), ``calibration``,
``jobs`` (sources, whole runs), ``security`` (attacks, sealing) and ``serving`` (HTTP), and
``cli``. Module paths from before this layout still import (``nnobfuscator._compat``).
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

from nnobfuscator import _compat
from nnobfuscator.version import __version__

if TYPE_CHECKING:
    from nnobfuscator.calibration.calibrator import CalibrationError, calibrate, evaluate
    from nnobfuscator.calibration.report import plot_report, write_report
    from nnobfuscator.core.data import Split
    from nnobfuscator.core.layer_adapters import LayerAdapter, register_layer_adapter
    from nnobfuscator.core.outputs import read_output
    from nnobfuscator.core.serialization import ArtifactError
    from nnobfuscator.core.tiers import Target, Tier, parse_tiers
    from nnobfuscator.serving import create_app
    from nnobfuscator.strategies import (
        FeatureMixConfig,
        Strategy,
        StrategyConfig,
        get_strategy,
        list_strategies,
        register_block,
        register_strategy,
    )
    from nnobfuscator.tiered.model import InputSpec, TieredModel
    from nnobfuscator.tiered.obfuscate import ObfuscationConfig, obfuscate

#: public name -> the module it comes from
_EXPORTS = {
    "ArtifactError": "nnobfuscator.core.serialization",
    "CalibrationError": "nnobfuscator.calibration.calibrator",
    "InputSpec": "nnobfuscator.tiered.model",
    "LayerAdapter": "nnobfuscator.core.layer_adapters",
    "ObfuscationConfig": "nnobfuscator.tiered.obfuscate",
    "Split": "nnobfuscator.core.data",
    "FeatureMixConfig": "nnobfuscator.strategies",
    "Strategy": "nnobfuscator.strategies",
    "StrategyConfig": "nnobfuscator.strategies",
    "Target": "nnobfuscator.core.tiers",
    "Tier": "nnobfuscator.core.tiers",
    "TieredModel": "nnobfuscator.tiered.model",
    "calibrate": "nnobfuscator.calibration.calibrator",
    "create_app": "nnobfuscator.serving",
    "evaluate": "nnobfuscator.calibration.calibrator",
    "get_strategy": "nnobfuscator.strategies",
    "list_strategies": "nnobfuscator.strategies",
    "obfuscate": "nnobfuscator.tiered.obfuscate",
    "parse_tiers": "nnobfuscator.core.tiers",
    "plot_report": "nnobfuscator.calibration.report",
    "read_output": "nnobfuscator.core.outputs",
    "register_block": "nnobfuscator.strategies",
    "register_layer_adapter": "nnobfuscator.core.layer_adapters",
    "register_strategy": "nnobfuscator.strategies",
    "write_report": "nnobfuscator.calibration.report",
}

__all__ = [
    "ArtifactError",
    "CalibrationError",
    "FeatureMixConfig",
    "InputSpec",
    "LayerAdapter",
    "ObfuscationConfig",
    "Split",
    "Strategy",
    "StrategyConfig",
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
    """Keeps a public name bound to the function, not to a submodule of the same name.

    Importing the old path ``nnobfuscator.calibrate`` (the module, now an alias) binds it as the
    package attribute ``calibrate``, which would hide the function from ``from nnobfuscator
    import calibrate``: the function wins.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
_compat.install()
