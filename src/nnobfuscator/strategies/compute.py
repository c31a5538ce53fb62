"""Compute strategies: a tier that does less work, with a discrete setting per tier.

A compute strategy holds one *setting* per tier (a small JSON-able dict, stored in
``Tier.params[name]``), a default setting that changes nothing, and the list of settings one step
cheaper than a given one. Calibration searches those steps for the cheapest setting whose utility
still clears the tier's target (``nnobfuscator.compute_search``), then a degrading strategy lands
the utility on the target.

To add one (say, fewer denoising steps for a diffusion pipeline), subclass :class:`ComputeStrategy`,
implement :meth:`default_setting`, :meth:`cheaper` and :meth:`apply_setting`, and register it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from nnobfuscator.strategies.base import Strategy

if TYPE_CHECKING:
    from nnobfuscator.model import TieredModel

Setting = dict[str, Any]


class ComputeStrategy(Strategy):
    """Base of strategies that save compute; one setting per tier, the default saving nothing."""

    kind: ClassVar[str] = "compute"
    role: ClassVar[str] = "compute"

    def __init__(self, key: bytes, targets: list[str] | None = None, **options: Any) -> None:
        super().__init__(key, targets, **options)
        self.settings: dict[str, Setting] = {}

    def attach(self, tiered: TieredModel) -> None:
        """Prepare the model (wrap blocks and so on); compute strategies override this."""

    def fit(self, tiered: TieredModel, batches: list[torch.Tensor]) -> None:
        """Learn what the strategy needs from calibration inputs (run by ``calibrate``)."""

    def default_setting(self) -> Setting:
        """The setting that saves nothing (and changes nothing)."""
        raise NotImplementedError

    def cheaper(self, setting: Setting) -> list[Setting]:
        """Settings one step cheaper than ``setting`` (empty when nothing more can be saved)."""
        raise NotImplementedError

    def apply_setting(self, tier: str, setting: Setting) -> None:
        """Make ``tier`` run with ``setting``."""
        raise NotImplementedError

    def set_setting(self, tier: str, setting: Setting) -> None:
        setting = copy.deepcopy(setting)
        self.apply_setting(tier, setting)
        self.settings[tier] = setting

    def setting(self, tier: str) -> Setting:
        return copy.deepcopy(self.settings.get(tier, self.default_setting()))

    def load_params(self, tier: str, params: dict[str, Any]) -> None:
        self.set_setting(tier, params)

    def is_active(self, tier: str) -> bool:
        return self.settings.get(tier, self.default_setting()) != self.default_setting()

    def set_strength(self, tier: str, strength: float) -> None:
        raise TypeError(
            f"{self.name} is a compute strategy: it takes a setting per tier, not a strength"
        )

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "targets": self.target_patterns}
