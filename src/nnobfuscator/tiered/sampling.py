"""Sampling seeded per request: the same prompt, seed and tier give the same text, whatever else
shares the batch.

``generate(do_sample=True)`` draws from the process-wide random stream, so a row's text depends on
the rows beside it and on every call before. :class:`SeededSampling` samples each row from its
own stream instead: at every step it warps the row's logits as ``generate`` would (temperature,
top-k, top-p) and adds Gumbel noise drawn from a generator seeded by the row's seed and the index
of the token being generated (counted from the end of the padded prompt, so padding changes
nothing), so that the greedy choice that follows is a draw from the warped distribution (the
Gumbel-max trick).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

#: sampling options :class:`SeededSampling` applies itself
WARPING_OPTIONS = ("temperature", "top_k", "top_p")


class SeededSampling(LogitsProcessor):
    """Warp each row's logits and add Gumbel noise from the row's own seeded stream.

    Args:
        seeds: one seed per row (a request's seed: the same seed draws the same tokens).
        temperature, top_k, top_p: as in ``generate``.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.seeds = [int(seed) for seed in seeds]
        self._prompt_length: int | None = None
        self.warpers = LogitsProcessorList()
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(int(top_k)))
        if top_p is not None and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(float(top_p)))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(self.seeds) != scores.shape[0]:
            raise ValueError(f"{len(self.seeds)} seeds for {scores.shape[0]} rows")
        scores = self.warpers(input_ids, scores.float())
        if self._prompt_length is None:  # the first step: counted from the (padded) prompt on,
            self._prompt_length = input_ids.shape[1]  # so padding does not change the draws
        step = input_ids.shape[1] - self._prompt_length
        noise = torch.stack([_gumbel(seed, step, scores.shape[1]) for seed in self.seeds])
        return scores + noise.to(scores.device)


def _gumbel(seed: int, step: int, size: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}/{step}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    uniform = torch.rand(size, generator=generator).clamp(1e-12, 1 - 1e-7)
    return -torch.log(-torch.log(uniform))


def seeded_call(seeds: Sequence[int], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate``'s options with sampling done by :class:`SeededSampling` (greedy over the
    noised logits), keeping the call's own logits processors before it."""
    kwargs = dict(kwargs)
    options = {name: kwargs.pop(name) for name in WARPING_OPTIONS if kwargs.get(name) is not None}
    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    processors.append(SeededSampling(seeds, **options))
    return {**kwargs, "do_sample": False, "logits_processor": processors}
