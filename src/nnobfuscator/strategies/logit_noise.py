"""Logit noise: the training-free baseline of the AIM paper, made keyed and deterministic.

At strength ``s`` each sample's logits get ``s * std(logits) * n`` added, where ``n`` is derived
from the key and a digest of the sample itself: repeating a query returns the same answer, so
voting over repeats gains nothing. (Slightly changed copies of an input draw other noise; feature
mixing, a smooth function of the input, does not have that weakness.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from nnobfuscator.outputs import batch_size, map_output, select
from nnobfuscator.security.keys import keyed_generator
from nnobfuscator.strategies.base import Strategy, register_strategy

_QUANT = 256.0


def sample_digests(inputs: Any) -> list[bytes]:
    """One digest per sample of a batch (images, token-id dicts, prompts), robust to float noise
    below 1/512."""
    return [_digest(select(inputs, torch.tensor([i]))) for i in range(batch_size(inputs))]


def _digest(item: Any) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(item, Mapping):
        for key in sorted(item):
            digest.update(key.encode() + _digest(item[key]))
    elif isinstance(item, torch.Tensor):
        if item.is_floating_point():
            item = torch.round(item.detach().float().cpu() * _QUANT).to(torch.int32)
        digest.update(item.detach().cpu().contiguous().numpy().tobytes())
    else:
        digest.update(repr(item).encode())
    return digest.digest()


@register_strategy
class LogitNoise(Strategy):
    name = "logit-noise"
    kind = "output"
    max_strength = 8.0
    description = "AIM-style logit noise, keyed and deterministic per input (no averaging attack)"

    def transform_output(self, output: Any, inputs: Any, tier: str) -> Any:
        strength = self.strength(tier)
        if strength == 0.0:
            return output
        digests = sample_digests(inputs)

        def add_noise(logits: torch.Tensor) -> torch.Tensor:
            if not logits.is_floating_point() or logits.shape[0] != len(digests):
                return logits
            noise = torch.stack(
                [
                    torch.randn(logits.shape[1:], generator=keyed_generator(self.key, self.name, d))
                    for d in digests
                ]
            ).to(device=logits.device, dtype=logits.dtype)
            flat = logits.flatten(1)
            scale = flat.std(dim=1).view(-1, *([1] * (logits.dim() - 1)))
            return logits + strength * scale * noise

        return map_output(output, add_noise)
