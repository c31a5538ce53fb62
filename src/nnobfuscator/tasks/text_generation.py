"""Text generation: next-token accuracy of a causal language model on held-out text.

A split holds token windows (``{"input_ids": (N, T), "attention_mask": (N, T)}``) and, as labels,
each position's next token (``(N, T - 1)``, ``-100`` where there is none). What is scored for a
batch is small whatever the vocabulary: per position, the predicted token and the log-probability
of the true next token (read from the batch's own input ids), so that calibration keeps two
numbers per token instead of a vocabulary's worth of logits. ``extra`` holds the perplexity and
the agreement of the predicted tokens with the full model's.
"""

from __future__ import annotations

from typing import Any

import torch

from nnobfuscator.core.outputs import read_output
from nnobfuscator.tasks.base import Task, register_task

#: label of a position without a next token (padding, the window's last position)
IGNORE = -100


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Each position's next token, ``IGNORE`` where the next position is padding."""
    labels = input_ids[:, 1:].clone()
    if attention_mask is not None:
        labels[(attention_mask[:, 1:] == 0) | (attention_mask[:, :-1] == 0)] = IGNORE
    return labels


@register_task
class TextGenerationTask(Task):
    """Next-token accuracy; ``extra`` holds perplexity and agreement with the full model."""

    name = "text-generation"
    metric = "next_token_accuracy"

    def read(self, output: Any, inputs: Any) -> torch.Tensor:
        """``(N, T - 1, 2)``: per position the predicted token and the log-probability of the
        true next token.

        Raises:
            ValueError: the inputs hold no ``input_ids`` or the output no ``(N, T, V)`` logits.
        """
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise ValueError("text-generation reads token windows: inputs={'input_ids': ...}")
        logits = read_output(output)
        ids = inputs["input_ids"]
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(
                f"text-generation needs logits (N, T, vocabulary) for input ids {tuple(ids.shape)}, "
                f"got {tuple(logits.shape)}"
            )
        logits = logits[:, :-1].float()
        following = ids[:, 1:].to(logits.device)
        chosen = logits.gather(-1, following.unsqueeze(-1)).squeeze(-1)
        log_probability = chosen - torch.logsumexp(logits, dim=-1)
        return torch.stack([logits.argmax(-1).float(), log_probability], dim=-1)

    def sample_count(self, targets: torch.Tensor) -> int:
        """The scored tokens (an upper bound on the independent ones: neighbouring tokens of a
        passage are correlated, so standard errors computed from it are optimistic)."""
        return int((targets != IGNORE).sum())

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        valid = targets != IGNORE
        return float((logits[..., 0].long() == targets)[valid].float().mean())

    def extra(
        self, logits: torch.Tensor, targets: torch.Tensor, full_logits: torch.Tensor
    ) -> dict[str, float]:
        valid = targets != IGNORE
        perplexity = torch.exp(-logits[..., 1][valid].mean())
        agreement = (logits[..., 0] == full_logits[..., 0])[valid].float().mean()
        return {"perplexity": float(perplexity), "agreement_with_full": float(agreement)}
