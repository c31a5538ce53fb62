"""Old module paths (before the layered layout of 0.6) keep importing: each is an alias of
the module's new home, the same module object, so ``isinstance`` checks and registries agree.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

#: old module path -> new module path
MOVED = {
    f"nnobfuscator.{old}": f"nnobfuscator.{new}"
    for old, new in {
        "tiers": "core.tiers",
        "wrapping": "core.wrapping",
        "executor": "tiered.executor",
        "model": "tiered.model",
        "serialization": "core.serialization",
        "outputs": "core.outputs",
        "registry": "core.registry",
        "answers": "core.answers",
        "data": "core.data",
        "home": "core.home",
        "diffusion": "core.diffusion",
        "cost": "tiered.cost",
        "core.model": "tiered.model",
        "core.executor": "tiered.executor",
        "core.cost": "tiered.cost",
        "security.keys": "core.key_derivation",
        "security.key_storage": "core.secret_key",
        "calibrate": "calibration.calibrator",
        "compute_search": "calibration.compute_search",
        "runner": "calibration.runner",
        "report": "calibration.report",
        "masks": "tasks.masks",
        "grid": "tasks.grid",
        "pipeline": "jobs.run",
        "sources": "jobs.sources",
        "training": "tasks.training",
        "core.training": "tasks.training",
        "security.extract": "extraction.extract",
        "security.decode": "extraction.decode",
        "security.distill": "extraction.distill",
        "security.augment": "extraction.augment",
        "security.oracle": "extraction.oracle",
        "serving.keystore": "serving.api_keys",
        "serving.load": "serving.load_signals",
        "serving.loader": "serving.served_model",
        "serving.conditions": "serving.policy_engine",
    }.items()
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # the import machinery set the alias's spec: undo that


def install() -> None:
    """Make the old paths importable (once per process)."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
