"""Text generation: next-token accuracy of a causal language model on held-out text.

A split holds token windows (``{"input_ids": (N, T), "attention_mask": (N, T)}``) and, as labels,
each position's next token (``(N, T - 1)``, ``-100`` where there is none). What is scored for a
batch is small whatever the vocabulary: per position, the predicted token and the log-probability
of the true next token (read from the batch's own input ids), so that calibration keeps two
numbers per token instead of a vocabulary's worth of logits. ``extra`` holds the perplexity and
the agreement of the predicted tokens with the full model's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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

    def effective_count(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """Tokens of one passage succeed or fail together more than independent tokens would:
        the count whose binomial standard error equals the spread of the passages' accuracies
        (``rows * p (1 - p) / var(row accuracy)``), between the passages and the tokens."""
        valid = targets != IGNORE
        counts = valid.sum(dim=1)
        kept = counts > 0
        tokens = int(counts.sum())
        if int(kept.sum()) < 2:
            return float(tokens)
        correct = ((logits[..., 0].long() == targets) & valid).sum(dim=1)
        rows = correct[kept].float() / counts[kept].float()
        p = correct.sum().item() / max(tokens, 1)
        spread = float(rows.var())
        if spread <= 0:
            return float(tokens)
        return float(min(max(int(kept.sum()) * p * (1 - p) / spread, int(kept.sum())), tokens))

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


_WORD = re.compile(r"\w+")


def first_word(text: str) -> str:
    """The first run of word characters in ``text`` (``""`` when there is none)."""
    found = _WORD.search(text)
    return found.group(0) if found else ""


@dataclass
class NextWordQuestions:
    """A task answered by generation: each prompt is a stretch of text, its answer the word that
    follows it; a generated answer counts when its first word is that word (exact match).

    Args:
        prompts: ``(N, context)`` token ids, no padding.
        answers: the next word of each prompt.
    """

    prompts: torch.Tensor
    answers: list[str]

    def __len__(self) -> int:
        return len(self.answers)

    def accuracy(self, texts: list[str]) -> float:
        """Share of generated ``texts`` whose first word is the answer."""
        if len(texts) != len(self.answers):
            raise ValueError(f"{len(texts)} answers for {len(self.answers)} questions")
        return sum(first_word(t) == a for t, a in zip(texts, self.answers, strict=True)) / max(
            len(texts), 1
        )


def next_word_questions(
    input_ids: torch.Tensor,
    tokenizer: Any,
    *,
    context: int = 48,
    per_window: int = 4,
    min_letters: int = 3,
) -> NextWordQuestions:
    """Next-word questions from token windows (``(N, T)``, no padding): per window, up to
    ``per_window`` positions evenly spread among those where a word of at least ``min_letters``
    letters begins (a token that decodes to a space and letters), each asked with the
    ``context`` tokens before it.

    Raises:
        ValueError: the windows are too short for ``context`` or hold no such word.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < context + 8:
        raise ValueError(
            f"next-word questions need windows (N, T) with T >= context + 8 = {context + 8}, "
            f"got {tuple(input_ids.shape)}"
        )
    prompts, answers = [], []
    for row in input_ids:
        starts = []
        for position in range(context, row.shape[0] - 8):
            piece = tokenizer.decode([int(row[position])])
            word = first_word(tokenizer.decode(row[position : position + 8].tolist()))
            if (
                piece[:1] == " "
                and piece[1:2].isalpha()
                and word.isalpha()
                and len(word) >= min_letters
            ):
                starts.append((position, word))
        step = max(len(starts) // per_window, 1)
        for position, word in starts[::step][:per_window]:
            prompts.append(row[position - context : position])
            answers.append(word)
    if not answers:
        raise ValueError("no word of the requested length begins in these windows")
    return NextWordQuestions(torch.stack(prompts), answers)
