"""Compute strategies: a tier that does less work, with a discrete setting per tier.

A compute strategy reads one *setting* per tier (a small JSON-able dict in
``Tier.params[name]``), has a default setting that changes nothing, and lists the settings one step
cheaper than a given one. Calibration searches those steps for the cheapest setting whose utility
still clears the tier's target (``nnobfuscator.compute_search``), then a degrading strategy lands
the utility on the target.

To add one (say, fewer denoising steps for a diffusion pipeline), subclass :class:`ComputeStrategy`,
implement :meth:`default_setting`, :meth:`cheaper` and :meth:`check_params`, and register it.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from nnobfuscator.strategies.base import Strategy
from nnobfuscator.wrapping import Host

Setting = dict[str, Any]


class ComputeStrategy(Strategy):
    """Base of strategies that save compute; one setting per tier, the default saving nothing."""

    kind: ClassVar[str] = "compute"
    role: ClassVar[str] = "compute"

    def attach(self, host: Host) -> None:
        """Prepare the model (wrap blocks and so on); compute strategies override this."""
        self.host = host

    def fit(self, run_clean: Any, batches: list[Any]) -> None:
        """Learn what the strategy needs from calibration inputs (run by ``calibrate``).

        Args:
            run_clean: ``run_clean(batch)`` runs the untouched model on one batch.
            batches: the calibration inputs.
        """

    def default_setting(self) -> Setting:
        """The setting that saves nothing (and changes nothing)."""
        raise NotImplementedError

    def cheaper(self, setting: Setting) -> list[Setting]:
        """Settings one step cheaper than ``setting`` (empty when nothing more can be saved)."""
        raise NotImplementedError

    def setting(self, tier: str) -> Setting:
        """The setting in force at ``tier`` (the default when it has none)."""
        return copy.deepcopy(self.params(tier) or self.default_setting())

    def is_active(self, tier: str) -> bool:
        return self.setting(tier) != self.default_setting()

    def signature(self, tier: str) -> Any:
        return None

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "targets": sorted(self.layers)}
