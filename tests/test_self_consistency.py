"""Next-word questions answered by generation, and voting over sampled answers at a tier (a tiny
Llama trained for seconds on a patterned token stream; a word tokenizer of two-letter words)."""

from __future__ import annotations

import string
import warnings

import pytest
import torch
from test_text_generation import VOCAB, pattern_windows, trained_llama, windows_split  # noqa: F401

from nnobfuscator import calibrate, obfuscate
from nnobfuscator.extraction.self_consistency import generated_words, vote_accuracy
from nnobfuscator.tasks.text_generation import first_word, next_word_questions


class WordTokenizer:
    """Token ``i`` is the word ``" " + WORDS[i]``; token 0 is punctuation (no word)."""

    WORDS = [","] + [a + b for a in string.ascii_lowercase for b in "xyz"][: VOCAB - 1]
    pad_token_id = None
    eos_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(" " + self.WORDS[int(i)] for i in ids)

    def batch_decode(self, rows: torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row.tolist()) for row in rows]


def test_first_word_reads_the_leading_word():
    assert first_word("  Paris is") == "Paris"
    assert first_word(" , then") == "then"
    assert first_word(" ...") == ""


def test_questions_ask_for_the_word_that_follows_their_context():
    ids = pattern_windows(3, 40, seed=5)
    tokenizer = WordTokenizer()
    questions = next_word_questions(ids, tokenizer, context=12, per_window=2, min_letters=2)
    assert questions.prompts.shape[1] == 12 and len(questions) >= 3
    for prompt, answer in zip(questions.prompts, questions.answers, strict=True):
        row = next(r for r in ids if any(torch.equal(r[i : i + 12], prompt) for i in range(29)))
        start = next(i for i in range(29) if torch.equal(row[i : i + 12], prompt))
        assert tokenizer.WORDS[int(row[start + 12])] == answer
    assert questions.accuracy(questions.answers) == 1.0
    with pytest.raises(ValueError, match="context"):
        next_word_questions(ids[:, :10], tokenizer, context=12)


@pytest.fixture(scope="module")
def tiered_llama(trained_llama):  # noqa: F811
    tiered = obfuscate(
        trained_llama, tiers="free=60%,premium=full", compute="auto", task="text-generation"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrate(
            tiered,
            windows_split("calibration", pattern_windows(32, 24, seed=1)),
            progress=False,
        )
    return tiered


def test_votes_are_scored_against_the_tiers_own_answers(tiered_llama):
    tokenizer = WordTokenizer()
    questions = next_word_questions(
        pattern_windows(8, 40, seed=7), tokenizer, context=12, per_window=2, min_letters=2
    )
    greedy = generated_words(tiered_llama, tokenizer, questions, "free", max_new_tokens=2)
    direct = tiered_llama.generate(
        questions.prompts,
        tier="free",
        attention_mask=torch.ones_like(questions.prompts),
        max_new_tokens=2,
        do_sample=False,
        pad_token_id=0,
    )
    assert [w[0] for w in greedy] == [first_word(t) for t in tokenizer.batch_decode(direct[:, 12:])]
    result = vote_accuracy(
        tiered_llama, tokenizer, questions, "free", votes=(3,), seed=11, max_new_tokens=2
    )
    assert set(result) == {"greedy", "sampled", "vote@3"}
    assert result["greedy"] == questions.accuracy([w[0] for w in greedy])
    # the same seeds draw the same answers: asking again gains nothing
    again = vote_accuracy(
        tiered_llama, tokenizer, questions, "free", votes=(3,), seed=11, max_new_tokens=2
    )
    assert again == result
    # at a temperature near zero every draw is the greedy answer, and so is the vote
    cold = vote_accuracy(
        tiered_llama,
        tokenizer,
        questions,
        "free",
        votes=(3,),
        temperature=1e-4,
        max_new_tokens=2,
    )
    assert cold["vote@3"] == cold["sampled"] == cold["greedy"]
