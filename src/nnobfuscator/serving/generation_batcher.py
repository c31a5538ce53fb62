"""Request-level batching for text generation: concurrent completion requests, whatever their
tiers, decode together in ONE ``generate`` call, and each request gets its own row's new tokens
as they are decoded.

This is step-level sharing within a batch window, not continuous batching: the requests that
arrive within ``max_wait_ms`` of the first (up to ``max_batch_size``) form one batch, their
prompts left-padded into one tensor; every decoding step of that call serves all of them, each
row at its own tier (``TieredModel.generate(..., tiers=[...])``). A request that arrives while a
batch is decoding waits for the next batch. The call runs until its last row stops, each row
stopping at its own ``max_new_tokens``, end token, or when its request calls
:meth:`RowStream.stop` (a stop string seen, the client gone).

Rows that cannot share one call run in separate calls, one after another: greedy rows and
sampled rows (``do_sample`` is per call), sampled rows of different ``temperature`` / ``top_p``,
and tiers whose passes differ (``share_key``). Sampled rows of different prompt lengths share a
call: a row's seeded noise is drawn per generated token, so its padding does not move it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from nnobfuscator.serving.batcher import wait_for_batch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationJob:
    """One request's row: its prompt, tier, token budget and how it picks tokens.

    Args:
        prompt: the prompt's token ids (at least one).
        tier: the tier the row decodes at.
        max_new_tokens: the most tokens the row makes.
        temperature: ``None`` or 0: greedy; otherwise sampled at this temperature.
        top_p: nucleus sampling (sampled rows only).
        seed: a sampled row's seed (the same prompt, seed and tier give the same text).
    """

    prompt: Sequence[int]
    tier: str
    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return not self.temperature

    def call_key(self) -> tuple:
        """Rows with equal keys (and pass keys) can share one ``generate`` call."""
        if self.greedy:
            return (False,)
        return (True, self.temperature, self.top_p)


@dataclass(frozen=True)
class Finished:
    """How a row ended: ``"stop"`` (end token, or :meth:`RowStream.stop`) or ``"length"``;
    ``eos``: it made the end token (a token of its own, never sent as text)."""

    reason: FinishReason
    eos: bool = False


class RowStream:
    """One request's new token ids, as an async iterator fed from the decoding thread.

    After the iteration ends, :attr:`finish_reason` says why; a failed ``generate`` raises its
    error from the iteration.
    """

    def __init__(self, job: GenerationJob) -> None:
        self.job = job
        self.queue: asyncio.Queue[int | Finished | BaseException] = asyncio.Queue()
        self.finish_reason: FinishReason | None = None
        #: whether the row ended on the end token (one more token made than sent)
        self.eos = False
        #: read by the decoding thread at every step: set, the row stops there
        self.stopped = False
        self.enqueued = time.perf_counter()

    def stop(self) -> None:
        """End this row early (its request has what it needs, or has gone)."""
        self.stopped = True

    def __aiter__(self) -> RowStream:
        return self

    async def __anext__(self) -> int:
        if self.finish_reason is not None:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, Finished):
            self.finish_reason, self.eos = item.reason, item.eos
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finish_reason = "stop"
            raise item
        return item


class RowStreamer(BaseStreamer):
    """A ``generate`` streamer that hands each row's new token to its request's queue (through
    ``loop.call_soon_threadsafe``, as ``put`` runs in the decoding thread), and ends each row at
    its own limit, end token or stop."""

    def __init__(
        self, rows: Sequence[RowStream], loop: asyncio.AbstractEventLoop, eos: set[int]
    ) -> None:
        self.rows, self.loop, self.eos = list(rows), loop, eos
        self.made = [0] * len(self.rows)
        self.done = [False] * len(self.rows)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """The prompt (first call, ignored), then one new token per row per step."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for index, token in enumerate(value.reshape(-1).tolist()):
            if self.done[index]:
                continue
            row = self.rows[index]
            if token in self.eos or row.stopped:
                self.finish(index, "stop", eos=token in self.eos)
                continue
            self.made[index] += 1
            self._send(row, int(token))
            if self.made[index] >= row.job.max_new_tokens:
                self.finish(index, "length")

    def end(self) -> None:
        """``generate`` returned: every row still open ends (it met the context's end)."""
        for index in range(len(self.rows)):
            self.finish(index, "length")

    def finish(self, index: int, reason: FinishReason | BaseException, eos: bool = False) -> None:
        if self.done[index]:
            return
        self.done[index] = True
        item = reason if isinstance(reason, BaseException) else Finished(reason, eos)
        self._send(self.rows[index], item)

    def _send(self, row: RowStream, item: int | Finished | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(row.queue.put_nowait, item)


class RowLimits(StoppingCriteria):
    """Stops each row at its own ``max_new_tokens``, or once its request stopped it (the call
    runs on while any row does)."""

    def __init__(self, rows: Sequence[RowStream], prompt_length: int) -> None:
        self.rows, self.prompt_length = list(rows), prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        made = input_ids.shape[1] - self.prompt_length
        done = [row.stopped or made >= row.job.max_new_tokens for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class GenerationBatcher:
    """Collects concurrent completion requests into shared ``generate`` calls (see the module
    docstring: step-level sharing within a batch window, not continuous batching).

    Args:
        generate: ``TieredModel.generate`` (or a stand-in with its signature).
        pad_token_id: the id prompts are left-padded with (and finished rows get).
        eos_token_ids: ids that end a row.
        share_key: a tier's pass key: tiers with equal keys share one call
            (``model.executor.pass_key``); default: every tier shares.
        max_batch_size: most rows per call.
        max_wait_ms: how long the first request waits for others to join its batch.
        on_batch: called with ``(tiers, seconds)`` after each call (metrics).
        on_wait: called with each request's seconds in the queue when its call starts.
    """

    def __init__(
        self,
        generate: Callable[..., Any],
        *,
        pad_token_id: int,
        eos_token_ids: Sequence[int] = (),
        share_key: Callable[[str], Hashable] | None = None,
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[list[str], float], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.generate = generate
        self.pad_token_id = int(pad_token_id)
        self.eos = {int(i) for i in eos_token_ids}
        self.share_key = share_key or (lambda tier: ())
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch, self.on_wait = on_batch, on_wait
        self._waiting: list[RowStream] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnobf-generate")

    @property
    def pending(self) -> int:
        """Requests waiting for the next batch."""
        return len(self._waiting)

    def submit(self, job: GenerationJob) -> RowStream:
        """Queue ``job`` for the next batch; iterate the returned stream for its tokens.

        Raises:
            ValueError: an empty prompt or a ``max_new_tokens`` below 1.
        """
        if not job.prompt or job.max_new_tokens < 1:
            raise ValueError("a generation job needs a prompt token and max_new_tokens >= 1")
        loop = asyncio.get_running_loop()
        worker = self._worker
        if self._arrived is None or self._loop is not loop or worker is None or worker.done():
            self._loop, self._arrived, self._waiting = loop, asyncio.Event(), []
            self._worker = loop.create_task(self._run(self._arrived), name="nnobf-generation")
        row = RowStream(job)
        self._waiting.append(row)
        self._arrived.set()
        return row

    async def _run(self, arrived: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await wait_for_batch(
                arrived, lambda: len(self._waiting), self.max_batch_size, self.max_wait
            )
            batch = self._waiting[: self.max_batch_size]
            self._waiting = self._waiting[self.max_batch_size :]
            for rows in self.calls(batch):
                for row in rows:
                    if row.stopped:  # its request left while it waited
                        row.queue.put_nowait(Finished("stop"))
                live = [row for row in rows if not row.stopped]
                if live:
                    await self._decode(loop, live)

    def calls(self, batch: Sequence[RowStream]) -> list[list[RowStream]]:
        """The rows of ``batch`` grouped by the ``generate`` call they can share, in order of
        arrival."""
        groups: dict[tuple, list[RowStream]] = {}
        for row in batch:
            key = (self.share_key(row.job.tier), *row.job.call_key())
            groups.setdefault(key, []).append(row)
        return list(groups.values())

    async def _decode(self, loop: asyncio.AbstractEventLoop, rows: list[RowStream]) -> None:
        started = time.perf_counter()
        if self.on_wait is not None:
            for row in rows:
                self.on_wait(started - row.enqueued)
        streamer = RowStreamer(rows, loop, self.eos)
        try:
            await loop.run_in_executor(self._executor, self._call, rows, streamer)
        except Exception as err:  # one failed call fails its rows, not the server
            for index in range(len(rows)):
                streamer.finish(index, err)
            return
        if self.on_batch is not None:
            self.on_batch([row.job.tier for row in rows], time.perf_counter() - started)

    def _call(self, rows: list[RowStream], streamer: RowStreamer) -> None:
        """One ``generate`` call for ``rows`` (in the decoding thread)."""
        length = max(len(row.job.prompt) for row in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for index, row in enumerate(rows):  # left padding: every row's last token lines up
            prompt = torch.as_tensor(list(row.job.prompt), dtype=torch.long)
            ids[index, length - len(prompt) :] = prompt
            mask[index, length - len(prompt) :] = 1
        first = rows[0].job
        options: dict[str, Any] = {"do_sample": False}
        if not first.greedy:
            seeds = [row.job.seed for row in rows]
            options = {"do_sample": True, "temperature": first.temperature, "seed": seeds}
            if first.top_p is not None:
                options["top_p"] = first.top_p
        with torch.inference_mode():
            self.generate(
                ids,
                attention_mask=mask,
                tiers=[row.job.tier for row in rows],
                max_new_tokens=max(row.job.max_new_tokens for row in rows),
                pad_token_id=self.pad_token_id,
                eos_token_id=sorted(self.eos) or None,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([RowLimits(rows, length)]),
                **options,
            )

    async def aclose(self) -> None:
        """Stop the worker (waiting requests end with an error) and the decoding thread."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for row in self._waiting:
            row.queue.put_nowait(RuntimeError("the server is shutting down; retry elsewhere"))
        self._waiting = []
        self._executor.shutdown(wait=False, cancel_futures=True)
