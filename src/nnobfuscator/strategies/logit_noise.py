"""Logit noise: the training-free baseline of the AIM paper, keyed and stable under small changes.

At strength ``s`` each sample's logits ``z`` (per pixel for segmentation) get
``s * std(z) * (e[r] - e[c] + 0.3 * T[c])`` added, where ``c`` and ``r`` are the clean predicted
class and runner-up, ``e`` one-hot vectors and ``T`` a keyed ``C x C`` table of standard normal
rows. The least confident predictions flip to the model's own second choice, so the tier's
mistakes look like the model's natural confusions.

The noise depends only on the clean top two classes, never on the exact input: repeating a query
returns the same answer, and so does a slightly shifted, rotated or noisy copy whose clean top two
are unchanged. On the demo ResNet-18 (``free=60%,pro=85%``, 21 queries per input) voting over
repeats gained 0 points, over faintly noisy copies at most 1.3 and over changed copies at most 3.1
(pro tier, no compute saving), and a user with 1,000 labelled images who maps answered labels back
to true classes gained nothing. Measured alternatives: noise from a digest of the exact input (the
first version) fell to faintly noisy copies (free tier 58.6% -> 97.3%); keyed noise chosen by the
predicted class alone, ``T[c]``, resisted voting but its systematic flips mapped back from labels
alone (61.7% -> 71.5%). Like every deterministic tier, it keeps what tells classes apart: answers
with scores can be decoded (``nnobf attack``; ``benchmarks/RESULTS.md``, "Attacks on served
tiers").
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch

from nnobfuscator.core.key_derivation import keyed_normal
from nnobfuscator.core.outputs import map_output
from nnobfuscator.strategies.base import Strategy, register_strategy
from nnobfuscator.strategies.options import StrategyConfig

#: the keyed table's share of the noise (the push from the predicted class to the runner-up is 1)
TABLE_WEIGHT = 0.3


def runner_up_noise(logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``e[r] - e[c] + TABLE_WEIGHT * T[c]`` along the class axis 1, shaped like ``logits``
    (``(N, C)`` or ``(N, C, H, W)``), for the clean top two classes ``c`` and ``r``."""
    top = logits.topk(2, dim=1).indices
    noise = TABLE_WEIGHT * table.to(device=logits.device, dtype=logits.dtype)[top[:, 0]]
    noise = noise.movedim(-1, 1).contiguous()
    ones = torch.ones_like(top[:, :1], dtype=logits.dtype)
    return noise.scatter_add_(1, top[:, 1:], ones).scatter_add_(1, top[:, :1], -ones)


def sample_scale(logits: torch.Tensor) -> torch.Tensor:
    """Each sample's logit standard deviation, broadcastable against ``logits``."""
    return logits.flatten(1).std(dim=1).view(-1, *([1] * (logits.dim() - 1)))


@register_strategy
class LogitNoise(Strategy):
    name = "logit-noise"
    kind = "output"
    max_strength = 8.0
    description = (
        "keyed logit noise chosen by the clean top two classes (AIM-style, made deterministic): "
        "the same answer for a query, its repeats and its slightly changed copies"
    )
    #: bumped when the noise changes, so artifacts of another version refuse to load
    scheme: ClassVar[str] = "runner-up/3"

    def __init__(self, key: bytes, options: StrategyConfig | None = None) -> None:
        super().__init__(key, options)
        self._tables: dict[int, torch.Tensor] = {}

    def table(self, classes: int) -> torch.Tensor:
        """The keyed ``classes x classes`` table (row ``c``: noise of predicted class ``c``)."""
        if classes not in self._tables:
            self._tables[classes] = keyed_normal(self.key, (classes, classes), self.name, "table")
        return self._tables[classes]

    def transform_output(self, output: Any, inputs: Any, tier: str) -> Any:
        strength = self.strength(tier)
        if strength == 0.0:
            return output

        def add_noise(logits: torch.Tensor) -> torch.Tensor:
            if not logits.is_floating_point() or logits.dim() < 2 or logits.shape[1] < 2:
                return logits
            noise = runner_up_noise(logits, self.table(logits.shape[1]))
            return logits + strength * sample_scale(logits) * noise

        return map_output(output, add_noise)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.name}/{self.scheme}".encode()).hexdigest()[:16]
