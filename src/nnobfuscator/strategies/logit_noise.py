"""Logit noise: the training-free baseline of the AIM paper, made keyed and deterministic.

At strength ``s`` each sample's logits get ``s * std(logits) * n`` added, where ``n`` is derived
from the key and a digest of the sample itself: repeating a query returns the same answer, so
voting over repeats gains nothing. (Slightly changed copies of an input draw other noise; feature
mixing, a smooth function of the input, does not have that weakness.)
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from nnobfuscator.security.keys import keyed_generator
from nnobfuscator.strategies.base import Strategy, register_strategy

_QUANT = 256.0


def sample_digest(sample: torch.Tensor) -> bytes:
    """A digest of one input sample, robust to float noise below 1/512."""
    quantized = torch.round(sample.detach().float().cpu() * _QUANT).to(torch.int32)
    return hashlib.blake2b(quantized.numpy().tobytes(), digest_size=16).digest()


def map_logits(output: Any, fn) -> Any:
    """Apply ``fn`` to the logits tensor(s) of a model output (tensor or torchvision dict)."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, dict):
        return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in output.items()}
    raise TypeError(f"logit noise cannot read a model output of type {type(output).__name__}")


@register_strategy
class LogitNoise(Strategy):
    name = "logit-noise"
    kind = "output"
    max_strength = 8.0
    description = "AIM-style logit noise, keyed and deterministic per input (no averaging attack)"

    def transform_output(self, output: Any, inputs: torch.Tensor, tier: str) -> Any:
        strength = self.strengths.get(tier, 0.0)
        if strength == 0.0:
            return output
        digests = [sample_digest(sample) for sample in inputs]

        def add_noise(logits: torch.Tensor) -> torch.Tensor:
            noise = torch.stack(
                [
                    torch.randn(logits.shape[1:], generator=keyed_generator(self.key, self.name, d))
                    for d in digests
                ]
            ).to(device=logits.device, dtype=logits.dtype)
            flat = logits.flatten(1)
            scale = flat.std(dim=1).view(-1, *([1] * (logits.dim() - 1)))
            return logits + strength * scale * noise

        return map_logits(output, add_noise)
