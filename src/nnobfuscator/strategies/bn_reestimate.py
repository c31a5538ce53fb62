"""BatchNorm statistics re-estimated per compute setting (training-free, as in slimmable networks).

A tier that skips blocks, slims channels or shrinks its input feeds the BatchNorm layers after the
change activations whose mean and variance differ from training; normalising them with the user's
running statistics shifts every later layer. Whenever a model has compute strategies, each of its
BatchNorm layers (any ``nn.modules.batchnorm._BatchNorm``, found by type) is wrapped as a
:class:`TieredNorm`: at a tier with re-estimated statistics it normalises with them, otherwise
(the untouched model, a ``full`` tier, a tier without a compute setting) the user's layer runs
as it is, bit-exact. In a pass mixing tiers, each sample is normalised with its own tier's
statistics, so they never split a pass.

Statistics are measured by a :class:`Measurement` pass over calibration inputs at the tier: each
norm whose input differs from the untouched model's on the same inputs (compared with a reference
pass) normalises with the batch's own statistics and records them; a norm whose input is unchanged
keeps the user's. With the whole measured batch in one pass, the recorded statistics reproduce that
pass's outputs exactly in eval mode. A :class:`NormStore` (one per wrapped model) holds them per
tier (two vectors per changed norm) and saves them with the compute strategies' state tensors.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnobfuscator.core.tier_pass import MixedPassUnsupported, TierContext, ordinary
from nnobfuscator.core.wrapping import Host, unwrapped_name

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]
PREFIX = "bn-reestimate"


class Measurement:
    """One measuring pass: what each norm sees, as reference or as a tier's new statistics.

    Args:
        reference: the untouched model's batch statistics per norm on the same inputs; ``None``
            records them (the reference pass itself).
    """

    def __init__(self, reference: Stats | None) -> None:
        self.reference = reference
        self.recording_reference = reference is None
        self.found: Stats = {}
        self.seen: Stats = {}

    def normalise(
        self, norm: TieredNorm, x: torch.Tensor, channels: torch.Tensor | None
    ) -> torch.Tensor:
        base = norm.base_layer
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = (t.float() for t in torch.var_mean(x, dims, unbiased=False))
        if self.recording_reference:
            self.seen[norm.norm_name] = (mean, var)
            return _apply(base, x, None, channels)
        assert self.reference is not None
        ref = self.reference.get(norm.norm_name)
        if ref is not None:
            ref_mean, ref_var = (t if channels is None else t[channels] for t in ref)
            if ref_mean.shape == mean.shape and _close(mean, ref_mean) and _close(var, ref_var):
                return _apply(base, x, None, channels)  # input unchanged: the user's statistics
        full_mean = base.running_mean.detach().float().clone()
        full_var = base.running_var.detach().float().clone()
        if channels is None:
            full_mean, full_var = mean, var
        else:
            full_mean[channels], full_var[channels] = mean, var
        self.found[norm.norm_name] = (full_mean, full_var)
        return _apply(base, x, (mean.to(x.dtype), var.to(x.dtype)), channels)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))


def _apply(
    base: nn.Module,
    x: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor] | None,
    channels: torch.Tensor | None,
) -> torch.Tensor:
    """``base`` (a BatchNorm) on ``x`` with ``stats`` (``None``: its running statistics), over
    ``channels`` of its features (all when ``None``)."""
    mean, var = stats if stats is not None else (base.running_mean, base.running_var)
    weight, bias = base.weight, base.bias
    if channels is not None:
        weight = None if weight is None else weight.index_select(0, channels)
        bias = None if bias is None else bias.index_select(0, channels)
        if stats is None:
            mean, var = mean.index_select(0, channels), var.index_select(0, channels)
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, base.eps)


class NormStore:
    """The re-estimated statistics of one wrapped model's BatchNorm layers, per tier.

    Args:
        host: the host whose model's norms are wrapped (once, by the first compute strategy).
    """

    def __init__(self, host: Host) -> None:
        self.host = host
        self.norms: dict[str, TieredNorm] = {}
        #: per tier: the compute settings the statistics were measured at, and the statistics
        self.tiers: dict[str, tuple[dict[str, Any], Stats]] = {}
        self.session: Measurement | None = None
        for name, module in list(host.root.named_modules()):
            if getattr(module, "nnobf_wrapper", False) or not _is_norm(module):
                continue
            plain = unwrapped_name(name)
            wrapper = host.wrap(
                plain, lambda child, n=plain: TieredNorm(child, host.context, self, n)
            )
            if isinstance(wrapper, TieredNorm):
                self.norms[plain] = wrapper

    # --- per-tier statistics -------------------------------------------------------------
    def compute_params(self, tier: str) -> dict[str, Any]:
        """The tier's compute settings (what its statistics depend on)."""
        info = self.host.tiers.get(tier)
        if info is None:
            return {}
        return {
            name: params
            for name, params in info.params.items()
            if name in _compute_names(self.host)
        }

    def install(self, tier: str, stats: Stats) -> None:
        """Use ``stats`` at ``tier`` (for its current compute settings)."""
        plain = {name: (ordinary(mean), ordinary(var)) for name, (mean, var) in stats.items()}
        self.tiers[tier] = (_snapshot(self.compute_params(tier)), plain)

    def clear(self, tier: str) -> None:
        self.tiers.pop(tier, None)

    def stats(self, tier: str | None) -> Stats:
        """The statistics in force at ``tier`` (empty when it uses the user's everywhere)."""
        if tier is None or tier not in self.tiers:
            return {}
        settings, stats = self.tiers[tier]
        return stats if settings == self.compute_params(tier) else {}

    def lookup(self, tier: str | None, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.stats(tier).get(name)

    # --- measuring -----------------------------------------------------------------------
    def measuring(self, reference: Stats | None) -> _Session:
        """A context in which every norm measures (see :class:`Measurement`)."""
        return _Session(self, Measurement(reference))

    # --- persistence ---------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for tier in sorted(self.tiers):
            for name, (mean, var) in sorted(self.stats(tier).items()):
                tensors[f"{PREFIX}/{tier}/{name}/mean"] = mean.detach().float().cpu().contiguous()
                tensors[f"{PREFIX}/{tier}/{name}/var"] = var.detach().float().cpu().contiguous()
        return tensors

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        found: dict[str, Stats] = {}
        for key, tensor in tensors.items():
            parts = key.split("/")
            if len(parts) != 4 or parts[0] != PREFIX or parts[3] != "mean":
                continue
            var = tensors.get(key[: -len("mean")] + "var")
            if var is not None and parts[2] in self.norms:
                found.setdefault(parts[1], {})[parts[2]] = (tensor.float(), var.float())
        for tier, stats in found.items():
            self.install(tier, stats)


class _Session:
    def __init__(self, store: NormStore, measurement: Measurement) -> None:
        self.store, self.measurement = store, measurement

    def __enter__(self) -> Measurement:
        if self.store.session is not None:
            raise RuntimeError("a BatchNorm measurement is already in progress")
        self.store.session = self.measurement
        return self.measurement

    def __exit__(self, *exc: object) -> None:
        self.store.session = None


def _snapshot(params: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(params)


def _compute_names(host: Host) -> set[str]:
    return _COMPUTE_NAMES.get(host, set())


#: per host, the names of its compute strategies (registered as they attach)
_COMPUTE_NAMES: weakref.WeakKeyDictionary[Host, set[str]] = weakref.WeakKeyDictionary()
_STORES: weakref.WeakKeyDictionary[Host, NormStore] = weakref.WeakKeyDictionary()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats


def norm_store(host: Host, strategy: str) -> NormStore:
    """The host's norm store (created, wrapping every BatchNorm, on first use by ``strategy``)."""
    _COMPUTE_NAMES.setdefault(host, set()).add(strategy)
    if host not in _STORES:
        _STORES[host] = NormStore(host)
    return _STORES[host]


def find_store(host: Host | None) -> NormStore | None:
    """The host's norm store, or ``None`` when no compute strategy made one."""
    return None if host is None else _STORES.get(host)


class TieredNorm(nn.Module):
    """A BatchNorm that normalises with the active tier's re-estimated statistics, if any (in a
    pass mixing tiers, each sample with its own tier's).

    The user's layer stays reachable as ``base_layer`` and runs untouched otherwise.
    """

    def __init__(
        self, base_layer: nn.Module, context: TierContext, store: NormStore, name: str
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.norm_name = name
        self._context = context
        self._store = weakref.ref(store)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
        return getattr(self.base_layer, name)

    def statistics(self, tier: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The re-estimated (mean, var) at ``tier`` (``None``: the user's running statistics)."""
        store = self._store()
        return None if store is None else store.lookup(tier, self.norm_name)

    def pass_statistics(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """The statistics of each distinct tier of the pass in flight (one entry unless it mixes
        tiers; ``None``: the user's running statistics)."""
        state = self._context.state
        if state is None or state.rows is None:
            return [self.statistics(self._context.current)]
        return [self.statistics(tier) for tier in state.groups()[0]]

    def normalise(self, x: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
        """This norm on ``x``, which holds ``channels`` of its features (all when ``None``); in
        a pass mixing tiers, each sample with its own tier's statistics."""
        store = self._store()
        if store is not None and store.session is not None:
            return store.session.normalise(self, x, channels)
        return self._normalise(x, self.pass_statistics(), channels)

    def _normalise(
        self,
        x: torch.Tensor,
        found: list[tuple[torch.Tensor, torch.Tensor] | None],
        channels: torch.Tensor | None,
    ) -> torch.Tensor:
        """This norm on ``x`` with ``found`` (:meth:`pass_statistics`)."""
        if any(stats is not found[0] for stats in found[1:]):
            return self._per_sample(x, found, channels)
        stats = found[0]
        if stats is not None:
            stats = tuple(t.to(x.device, x.dtype) for t in stats)  # type: ignore[assignment]
            if channels is not None:
                stats = tuple(t.index_select(0, channels) for t in stats)  # type: ignore[assignment]
        return _apply(self.base_layer, x, stats, channels)

    def _per_sample(
        self,
        x: torch.Tensor,
        found: list[tuple[torch.Tensor, torch.Tensor] | None],
        channels: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x * scale + shift`` with a scale and shift per sample (its tier's statistics folded
        with the layer's affine parameters).

        Raises:
            MixedPassUnsupported: ``x`` has no leading batch axis of the pass's size.
        """
        state = self._context.state
        assert state is not None
        index = state.groups()[1].to(x.device)
        if x.dim() < 2 or x.shape[0] != len(index):
            raise MixedPassUnsupported(f"{self.norm_name}: no batch axis of {len(index)} samples")
        base = self.base_layer
        scales, shifts = [], []
        for stats in found:
            mean, var = stats if stats is not None else (base.running_mean, base.running_var)
            scale = torch.rsqrt(var.to(x.device, torch.float32) + base.eps)
            if base.weight is not None:
                scale = scale * base.weight.float()
            shift = -mean.to(x.device, torch.float32) * scale
            if base.bias is not None:
                shift = shift + base.bias.float()
            scales.append(scale)
            shifts.append(shift)
        scale, shift = torch.stack(scales), torch.stack(shifts)
        if channels is not None:
            scale, shift = scale.index_select(1, channels), shift.index_select(1, channels)
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        scale = scale.index_select(0, index).to(x.dtype).view(shape)
        shift = shift.index_select(0, index).to(x.dtype).view(shape)
        return torch.addcmul(shift, x, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store = self._store()
        if self.base_layer.training or store is None:
            return self.base_layer(x)
        if store.session is not None:
            return store.session.normalise(self, x, None)
        found = self.pass_statistics()
        if all(stats is None for stats in found):
            return self.base_layer(x)
        return self._normalise(x, found, None)
