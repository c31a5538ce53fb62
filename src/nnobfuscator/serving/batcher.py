"""Micro-batching: concurrent requests, whatever their tiers, share one forward pass.

Each request brings one sample and its tier. The batcher collects requests for up to
``max_wait_ms`` (or until ``max_batch_size``), stacks samples of the same shape and calls
``forward(batch, tiers)`` once per shape group, in a worker thread so the event loop keeps
accepting requests. Each sample's output row goes back to its own request: a tier is a
per-sample argument of the forward, never shared state, so it cannot leak between requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

Forward = Callable[[Any, list[str]], Any]
#: under load, a batch of a cheap tier holds at most this many times ``max_batch_size`` samples
_MOST_PER_FULL_SAMPLE = 8


async def wait_for_batch(
    arrived: asyncio.Event, waiting: Callable[[], int], max_size: int, max_wait: float
) -> None:
    """Wait for a first request, then for more until ``max_size`` wait (``waiting()`` counts
    them) or ``max_wait`` seconds have passed since the first; ``arrived`` is set on each."""
    loop = asyncio.get_running_loop()
    while not waiting():
        arrived.clear()
        await arrived.wait()
    deadline = loop.time() + max_wait
    while waiting() < max_size:
        left = deadline - loop.time()
        if left <= 0:
            break
        arrived.clear()
        try:
            await asyncio.wait_for(arrived.wait(), left)
        except TimeoutError:
            break


@dataclass
class _Item:
    sample: Any
    tier: str
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    waited: bool = False


class MicroBatcher:
    """Collects single-sample requests into mixed-tier batches.

    Args:
        forward: ``forward(batch, tiers) -> outputs``; ``batch`` is a stacked tensor (or a list
            of strings for prompts) and ``tiers`` one tier name per sample.
        max_batch_size: most samples per forward call.
        max_wait_ms: how long the first request waits for others to join its batch.
        on_batch: called with ``(tiers, seconds)`` after each forward (for metrics).
        on_wait: called with each request's seconds in the queue when its batch starts.
        rank: a tier's priority (higher first); with more requests waiting than a batch holds,
            higher tiers go first. ``None``: first come, first served.
        starve_ms: aging: a request gains one rank per ``starve_ms`` it waits (so lower tiers
            are slowed under load, never starved, and higher tiers still go first).
        cost: a tier's compute per sample relative to the full tier. Under load (more requests
            waiting than a batch holds) a batch takes one tier only, the first in line, and
            holds ``max_batch_size`` full-tier samples' worth of compute: more samples of a
            cheap tier, one forward pass each (tiers of different input sizes never share one).
        preempt_ms: with ``rank``, a batch larger than ``max_batch_size`` (a cheap tier's,
            under load) runs in chunks of about this many milliseconds (from the tier's measured
            time per sample; at least ``max_batch_size`` samples each); each chunk's answers go
            out when it ends, and when a request of a higher rank is waiting, the rest of the
            batch goes back to the queue. A higher tier then waits for one chunk, not a whole
            batch of a cheap tier. ``None``: batches run whole.
    """

    def __init__(
        self,
        forward: Forward,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        on_batch: Callable[[list[str], float], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
        rank: Callable[[str], int] | None = None,
        starve_ms: float = 2000.0,
        cost: Callable[[str], float] | None = None,
        preempt_ms: float | None = None,
    ) -> None:
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch, self.on_wait = on_batch, on_wait
        self.rank = rank
        self.starve = starve_ms / 1000.0
        self.cost = cost
        self.preempt = None if preempt_ms is None else preempt_ms / 1000.0
        #: measured seconds per sample of each tier (moving average over its batches)
        self._sample_seconds: dict[str, float] = {}
        self._waiting: list[_Item] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnobf-forward")

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def _ensure_worker(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if (
            self._arrived is None
            or self._loop is not loop
            or self._worker is None
            or self._worker.done()  # a worker that died is replaced, never waited on
        ):
            self._loop, self._arrived, self._waiting = loop, asyncio.Event(), []
            self._worker = loop.create_task(self._run(self._arrived), name="nnobf-batcher")
        return self._arrived

    async def submit(self, sample: Any, tier: str) -> Any:
        """Run one sample at ``tier`` and return its own output (batch dimension removed)."""
        arrived = self._ensure_worker()
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Item(sample, tier, future))
        arrived.set()
        return await future

    async def _run(self, arrived: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await wait_for_batch(
                arrived, lambda: len(self._waiting), self.max_batch_size, self.max_wait
            )
            items = [item for item in self._next_batch() if not item.future.cancelled()]
            try:
                started = time.perf_counter()
                if self.on_wait is not None:
                    for item in items:
                        if not item.waited:  # once, not again after a preemption
                            self.on_wait(started - item.enqueued)
                        item.waited = True
                groups = _group_by_shape(items)
                for index, group in enumerate(groups):
                    left = await self._run_group(loop, group)
                    if left:  # outranked: the rest waits again, in its place by age
                        self._waiting[:0] = left + [i for g in groups[index + 1 :] for i in g]
                        break
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the worker must outlive any one batch
                _fail(items, err)

    def _next_batch(self) -> list[_Item]:
        """The next batch: every waiting request while they fit in one; under load, by tier
        rank plus age (one rank per ``starve_ms`` waited), oldest first among equals, and with
        ``cost``, the first in line's tier only, up to a full-tier batch's worth of compute."""
        waiting = self._waiting
        if self.rank is None or len(waiting) <= self.max_batch_size:
            batch, self._waiting = waiting[: self.max_batch_size], waiting[self.max_batch_size :]
            return batch
        now = time.perf_counter()
        waiting.sort(key=lambda item: (-self._standing(item, now), item.enqueued))
        if self.cost is None:
            batch, self._waiting = waiting[: self.max_batch_size], waiting[self.max_batch_size :]
            return batch
        tier = waiting[0].tier
        budget = self.max_batch_size / max(self.cost(tier), 1.0 / _MOST_PER_FULL_SAMPLE)
        batch: list[_Item] = []
        rest: list[_Item] = []
        for item in waiting:
            (batch if item.tier == tier and len(batch) < budget else rest).append(item)
        self._waiting = rest
        return batch

    def _standing(self, item: _Item, now: float) -> int:
        """An item's rank plus one per ``starve_ms`` it has waited."""
        assert self.rank is not None
        return self.rank(item.tier) + int((now - item.enqueued) / self.starve)

    def _chunk_size(self, group: list[_Item]) -> int:
        """How many samples of ``group`` run before the next preemption check: a batch larger
        than ``max_batch_size`` (a cheap tier's, under load) runs in chunks of about
        ``preempt_ms``, never fewer than ``max_batch_size`` samples; other batches run whole.
        Only :meth:`_next_batch` under load (``rank`` and ``cost``) forms such a batch, and it
        holds one tier."""
        if self.preempt is None or len(group) <= self.max_batch_size:
            return len(group)
        seconds = self._sample_seconds.get(group[0].tier)
        if seconds is None:  # not measured yet: a batch-sized probe measures it
            return self.max_batch_size
        return max(self.max_batch_size, min(len(group), int(self.preempt / seconds)))

    def _outranked(self, rest: list[_Item]) -> bool:
        """Whether a waiting request stands above every item of ``rest``."""
        if not self._waiting:
            return False
        now = time.perf_counter()
        best_waiting = max(self._standing(item, now) for item in self._waiting)
        return best_waiting > max(self._standing(item, now) for item in rest)

    async def _run_group(self, loop: asyncio.AbstractEventLoop, group: list[_Item]) -> list[_Item]:
        """Run one shape group, in chunks when preemption is on; the items left when a higher
        request cut in (empty when the whole group ran)."""
        size = self._chunk_size(group)
        for start in range(0, len(group), size):
            await self._run_chunk(loop, group[start : start + size])
            rest = group[start + size :]
            if rest and size < len(group) and self._outranked(rest):
                return rest
        return []

    async def _run_chunk(self, loop: asyncio.AbstractEventLoop, group: list[_Item]) -> None:
        tiers = [item.tier for item in group]
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(
                self._executor, _forward_split, self.forward, [i.sample for i in group], tiers
            )
            if len(outputs) != len(group):
                raise RuntimeError(
                    f"the model answered {len(outputs)} samples for a batch of {len(group)}"
                )
        except Exception as err:  # one bad batch fails its requests, not the server
            _fail(group, err)
            return
        seconds = time.perf_counter() - started
        if self.preempt is not None and len(set(tiers)) == 1:
            last = self._sample_seconds.get(tiers[0])
            now = seconds / len(tiers)
            self._sample_seconds[tiers[0]] = now if last is None else 0.7 * last + 0.3 * now
        if self.on_batch is not None:
            self.on_batch(tiers, seconds)
        for item, output in zip(group, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(output)

    async def aclose(self) -> None:
        """Stop the worker (pending requests are cancelled) and the forward thread."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for item in self._waiting:
            item.future.cancel()
        self._waiting = []
        self._executor.shutdown(wait=False, cancel_futures=True)


def _fail(items: list[_Item], err: Exception) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(err)


def _group_by_shape(items: list[_Item]) -> list[list[_Item]]:
    groups: dict[Any, list[_Item]] = {}
    for item in items:
        sample = item.sample
        key = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        groups.setdefault(key, []).append(item)
    return list(groups.values())


def _forward_split(forward: Forward, samples: list[Any], tiers: list[str]) -> list[Any]:
    with torch.inference_mode():
        output = forward(collate(samples), tiers)
    return split_batch(output, len(samples))


def collate(samples: list[Any]) -> Any:
    """One batch of samples: stacked tensors, a list of prompts, or for dict samples (a prompt
    and its seed) a dict of lists, numbers becoming a tensor."""
    if isinstance(samples[0], torch.Tensor):
        return torch.stack(samples)
    if isinstance(samples[0], Mapping):
        columns = {key: [sample[key] for sample in samples] for key in samples[0]}
        return {
            key: torch.tensor(values) if isinstance(values[0], int | float) else values
            for key, values in columns.items()
        }
    return list(samples)


def split_batch(output: Any, size: int) -> list[Any]:
    """Per-sample pieces of a batched output: tensors, dicts and tuples of them, lists, or an
    object with an ``images`` list (diffusers pipeline outputs)."""
    if isinstance(output, torch.Tensor):
        return list(output.unbind(0))
    if isinstance(output, Mapping):
        columns = {key: split_batch(value, size) for key, value in output.items()}
        return [{key: columns[key][i] for key in columns} for i in range(size)]
    if isinstance(output, tuple):
        columns = [split_batch(value, size) for value in output]
        return [tuple(column[i] for column in columns) for i in range(size)]
    if isinstance(output, Sequence) and len(output) == size:
        return list(output)
    if hasattr(output, "images") and len(output.images) == size:
        return list(output.images)
    raise TypeError(f"cannot split a {type(output).__name__} model output into {size} samples")
