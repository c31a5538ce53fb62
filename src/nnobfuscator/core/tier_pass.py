"""What one forward pass knows about tiers: the tier of each row, the pass's shared parameters
(:class:`TierPass`, :class:`TierContext`), and the cache of what tiers derive from weights
(:class:`DerivedCache`)."""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

_contexts = itertools.count()


class MixedPassUnsupported(RuntimeError):
    """A forward pass that serves samples at different tiers reached a place that cannot tell
    samples apart (a layer whose weight is read directly, an activation without a batch axis);
    the executor then runs the tiers one group at a time."""


def pass_of(rows: tuple[str | None, ...]) -> tuple[str | None, tuple[str | None, ...] | None]:
    """``(lead, rows)`` of a pass serving ``rows``, one active tier per sample (``None``: the
    untouched model): a single tier needs no per-sample rows; else the lead is the first tier."""
    if len(set(rows)) == 1:
        return rows[0], None
    return next(tier for tier in rows if tier is not None), rows


@dataclass
class TierPass:
    """The tiers of one forward pass.

    Args:
        lead: the tier whose compute setting (and weight-folding strategies) is in force; ``None``
            runs the untouched model.
        rows: for a pass that serves a batch mixing tiers, the tier of each sample (``None`` for a
            sample at the untouched model); ``None`` when every sample is at ``lead``.
    """

    lead: str | None
    rows: tuple[str | None, ...] | None = None
    _strengths: dict[int, float | torch.Tensor] = field(default_factory=dict, repr=False)
    _groups: tuple[tuple[str | None, ...], torch.Tensor] | None = field(default=None, repr=False)

    def groups(self) -> tuple[tuple[str | None, ...], torch.Tensor]:
        """The distinct tiers of ``rows`` (in order of first appearance) and, per sample, the
        index of its tier among them (``lead`` alone when ``rows`` is ``None``)."""
        if self._groups is None:
            rows = self.rows if self.rows is not None else (self.lead,)
            tiers = tuple(dict.fromkeys(rows))
            position = {tier: index for index, tier in enumerate(tiers)}
            self._groups = tiers, torch.tensor([position[tier] for tier in rows])
        return self._groups

    def strength(self, transform: Any) -> float | torch.Tensor:
        """``transform``'s strength in this pass: a number, or one per sample for mixed rows."""
        memo = self._strengths.get(id(transform))
        if memo is None:
            if self.rows is None:
                memo = transform.strength(self.lead) if self.lead is not None else 0.0
            else:
                values = [transform.strength(t) if t is not None else 0.0 for t in self.rows]
                memo = torch.tensor(values) if len(set(values)) > 1 else values[0]
            self._strengths[id(transform)] = memo
        return memo


class TierContext:
    """Carries the tier(s) of the forward pass in flight down to the wrapped modules.

    Backed by a ``ContextVar``: concurrent forwards in other threads or asyncio tasks each see
    their own pass, so no request ever sees another's.
    """

    def __init__(self) -> None:
        self._var: ContextVar[TierPass | None] = ContextVar(
            f"nnobf_tier_{next(_contexts)}", default=None
        )

    @property
    def state(self) -> TierPass | None:
        """The pass in flight (``None``: the untouched model)."""
        return self._var.get()

    @property
    def current(self) -> str | None:
        """The tier whose compute setting is in force (``None``: the untouched model)."""
        state = self._var.get()
        return None if state is None else state.lead

    @contextmanager
    def activate(
        self, tier: str | None, rows: tuple[str | None, ...] | None = None
    ) -> Iterator[None]:
        """Run at ``tier``; ``rows`` gives each sample its own tier (sharing ``tier``'s compute
        setting)."""
        token = self._var.set(None if tier is None and rows is None else TierPass(tier, rows))
        try:
            yield
        finally:
            self._var.reset(token)


class DerivedCache:
    """Tensors derived from the user's weights (folded or sliced per tier), bounded in bytes.

    The least recently used entries leave first; a miss recomputes. The bound keeps a tiered model
    near the size of one model however many tiers it has.

    Args:
        budget: the most bytes held, or a function giving it (evaluated on first use).
    """

    def __init__(self, budget: int | Callable[[], int], tiers: Mapping[str, Any] | None = None):
        self._budget = budget
        self._entries: OrderedDict[Any, tuple[int, Any]] = OrderedDict()
        self.nbytes = 0
        #: the model's tiers (how many a derived tensor may be kept for)
        self.tiers = tiers or {}
        self.reserved = 0
        self._lock = threading.Lock()  # forwards may run in several threads (serving lanes)
        self._holds = 0

    def reserve(self, nbytes_per_tier: int) -> bool:
        """Reserve room for a derived tensor at every tier (up to half the budget, first come);
        whether it was granted. A grant is a fixed decision, so outputs never depend on what the
        cache holds at the time of a call."""
        total = nbytes_per_tier * max(1, len(self.tiers))
        with self._lock:
            if self.reserved + total > self.budget // 2:
                return False
            self.reserved += total
            return True

    @property
    def budget(self) -> int:
        if callable(self._budget):
            self._budget = int(self._budget())
        return self._budget

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        """The entry for ``key``, made with ``make()`` on a miss (kept while the budget allows)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[1]
        value = make()
        size = tensor_bytes(value)
        budget = self.budget
        with self._lock:
            if key not in self._entries and (self._holds or size <= budget):
                if not self._holds:
                    self._shrink(budget - size)
                self._entries[key] = (size, value)
                self.nbytes += size
        return value

    def _shrink(self, limit: int) -> None:
        """Drop the least recently used entries until at most ``limit`` bytes remain."""
        while self._entries and self.nbytes > limit:
            _, (freed, _) = self._entries.popitem(last=False)
            self.nbytes -= freed

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Keep every entry made inside, over the budget, until the outermost hold ends (then
        the budget applies again): a generation re-runs the same tiers at every step, and
        re-deriving their slices each step would cost more than the step itself."""
        with self._lock:
            self._holds += 1
        try:
            yield
        finally:
            with self._lock:
                self._holds -= 1
                if not self._holds:
                    self._shrink(self.budget)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0
            self.reserved = 0


def tensor_identity(tensor: torch.Tensor) -> tuple:
    """Storage, device and in-place version of ``tensor``: what a derived tensor depends on."""
    try:
        version = tensor._version
    except RuntimeError:  # inference tensors keep no version (they cannot change in place)
        version = -1
    return tensor.data_ptr(), tensor.device, version


def ordinary(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as an ordinary tensor, detached: calibrated state measured under
    ``torch.inference_mode`` must not refuse later calls that run with autograd on."""
    if tensor.is_inference():
        with torch.inference_mode(False):
            return tensor.clone()
    return tensor.detach()


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or nested tuples, lists and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, tuple | list):
        return sum(tensor_bytes(v) for v in value)
    return 0
