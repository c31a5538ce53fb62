"""Compute strategies: a tier that does less work, with a discrete setting per tier.

A compute strategy reads one *setting* per tier (a small JSON-able dict in
``Tier.params[name]``), has a default setting that changes nothing, and lists the settings one step
cheaper than a given one. Calibration searches those steps for the cheapest setting whose utility
still clears the tier's target (``nnobfuscator.calibration.compute_search``), then a degrading strategy lands
the utility on the target.

To add one (say, fewer denoising steps for a diffusion pipeline), subclass :class:`ComputeStrategy`,
implement :meth:`default_setting`, :meth:`cheaper` and :meth:`check_params`, and register it;
:meth:`changes` and :meth:`covers` let the search reuse activations and prune (optional).

Every compute strategy shares the model's :class:`~nnobfuscator.strategies.bn_reestimate.NormStore`:
the BatchNorm statistics re-estimated for a tier's compute setting, saved with its state tensors.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from nnobfuscator.core.wrapping import Host
from nnobfuscator.strategies.base import Strategy
from nnobfuscator.strategies.bn_reestimate import NormStore, norm_store

Setting = dict[str, Any]


class ComputeStrategy(Strategy):
    """Base of strategies that save compute; one setting per tier, the default saving nothing."""

    kind: ClassVar[str] = "compute"
    role: ClassVar[str] = "compute"
    #: whether tiers with different settings of this strategy can share one forward pass (each
    #: sample routed by its own tier, as skipped blocks are); otherwise a tier whose setting
    #: differs needs a pass of its own in a batch mixing tiers
    shares_passes: ClassVar[bool] = False

    def pass_key(self, tier: str) -> Any:
        return None if self.shares_passes else super().pass_key(tier)

    def attach(self, host: Host) -> None:
        """Prepare the model (wrap blocks and so on); compute strategies override this.

        The first compute strategy of a model wraps its BatchNorm layers (see :attr:`norms`).
        """
        self.host = host
        self.norms: NormStore = norm_store(host, self.name)

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

    def changes(self, setting: Setting) -> dict[str, Any]:
        """What ``setting`` changes, by module name (``"<input>"``: the input, so everything).

        The compute search reuses activations of the modules before the first change; the
        default (the whole setting at the input) reuses nothing.
        """
        return {} if setting == self.default_setting() else {"<input>": setting}

    def covers(self, setting: Setting, other: Setting) -> bool:
        """Whether ``setting`` saves at least everything ``other`` saves (then, when ``other``
        loses too much utility, so does ``setting``). Only equality is known by default."""
        return setting == other

    def setting(self, tier: str) -> Setting:
        """The setting in force at ``tier`` (the default when it has none); read on every forward,
        so it is the tier's own object: copy it before changing it."""
        return self.params(tier) or self.default_setting()

    def is_active(self, tier: str) -> bool:
        return self.setting(tier) != self.default_setting()

    def signature(self, tier: str) -> Any:
        return None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The re-estimated BatchNorm statistics of every tier (shared by compute strategies)."""
        return self.norms.state_tensors() if hasattr(self, "norms") else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if hasattr(self, "norms"):
            self.norms.load_state_tensors(tensors)
