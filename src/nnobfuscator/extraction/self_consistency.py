"""Self-consistency against a text-generation tier: ask each question ``k`` times with different
seeds, sample, and answer with the most common answer.

Repeating one request gains nothing (the same prompt, seed and tier give the same text); a user
who changes the seed draws new samples from the tier's distribution, and voting over them is the
usual way to get more out of a sampled model (self-consistency). :func:`vote_accuracy` measures
what that gains over one greedy answer on a task answered by generation
(:class:`~nnobfuscator.tasks.text_generation.NextWordQuestions`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from nnobfuscator.tasks.text_generation import NextWordQuestions, first_word


def _majority(words: list[str]) -> str:
    """The most common word (ties: the one drawn first)."""
    counts = Counter(words)
    return max(words, key=lambda word: (counts[word], -words.index(word)))


def generated_words(
    model: Any,
    tokenizer: Any,
    questions: NextWordQuestions,
    tier: str,
    *,
    samples: int = 0,
    seed: int = 0,
    max_new_tokens: int = 4,
    temperature: float = 0.7,
    top_p: float = 0.95,
    batch_size: int = 32,
    progress: bool = False,
) -> list[list[str]]:
    """Per question, the first word of each answer ``model`` generates at ``tier``: one greedy
    answer when ``samples`` is 0, else ``samples`` sampled ones with seeds ``seed``,
    ``seed + 1``, ... (one generate call per batch of rows; each row samples from its own seeded
    stream)."""
    draws = max(samples, 1)
    rows = [(q, j) for q in range(len(questions)) for j in range(draws)]
    words: list[list[str]] = [[] for _ in range(len(questions))]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if samples else {}
    batches = range(0, len(rows), batch_size)
    for start in tqdm(batches, desc=f"{tier}: {draws} per question", disable=not progress):
        chunk = rows[start : start + batch_size]
        prompts = questions.prompts[[q for q, _ in chunk]]
        options: dict[str, Any] = {
            "attention_mask": torch.ones_like(prompts),
            "max_new_tokens": max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
            **sampling,
        }
        if samples:
            options["seed"] = [seed + j for _, j in chunk]
        else:
            options["do_sample"] = False
        with torch.inference_mode():
            out = model.generate(prompts, tier=tier, **options)
        texts = tokenizer.batch_decode(out[:, prompts.shape[1] :], skip_special_tokens=True)
        for (q, _), text in zip(chunk, texts, strict=True):
            words[q].append(first_word(text))
    return words


def vote_accuracy(
    model: Any,
    tokenizer: Any,
    questions: NextWordQuestions,
    tier: str,
    *,
    votes: Sequence[int] = (5, 10),
    seed: int = 0,
    **options: Any,
) -> dict[str, float]:
    """Accuracy of one greedy answer, of one sampled answer, and of the majority of ``k`` sampled
    answers for each ``k`` in ``votes`` (the first ``k`` of the same draws).

    Returns:
        ``{"greedy": ..., "sampled": ..., "vote@5": ..., "vote@10": ...}`` as fractions.
    """
    greedy = generated_words(model, tokenizer, questions, tier, **options)
    drawn = generated_words(
        model, tokenizer, questions, tier, samples=max(votes), seed=seed, **options
    )

    def accuracy(answers: list[str]) -> float:
        return sum(a == b for a, b in zip(answers, questions.answers, strict=True)) / len(questions)

    result = {
        "greedy": accuracy([words[0] for words in greedy]),
        "sampled": accuracy([words[0] for words in drawn]),
    }
    for k in votes:
        result[f"vote@{k}"] = accuracy([_majority(words[:k]) for words in drawn])
    return result
