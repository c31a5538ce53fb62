"""The prompts of the demo text-to-image model and the tokenizer that reads them (no download):
six phrasings of each digit, balanced calibration and test splits with their generation seeds,
and a CLIP tokenizer whose vocabulary is written here."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nnobfuscator.core.data import Split

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

MAX_TOKENS = 16  # the tokenizer's model_max_length: prompts are padded (or cut) to it
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHRASINGS = (
    "a handwritten digit {word}",
    "the number {digit}",
    "a drawing of the digit {word}",
    "handwritten {digit}",
    "an image of the number {word}",
    "the digit {digit} written by hand",
)
_START, _END = "<|startoftext|>", "<|endoftext|>"
_CHARACTERS = string.ascii_lowercase + string.digits + ".,:;!?'\"-()"


def prompt_for(digit: int, phrasing_index: int) -> str:
    """The prompt for ``digit`` in phrasing ``phrasing_index`` (taken modulo the phrasings)."""
    template = PHRASINGS[phrasing_index % len(PHRASINGS)]
    return template.format(word=DIGIT_WORDS[digit], digit=digit)


def prompt_splits(calibration: int = 300, test: int = 300, seed: int = 0) -> dict[str, Split]:
    """Calibration and test prompts with their generation seeds, labelled by the prompted digit.

    Sample ``i`` of a split prompts digit ``i % 10`` in phrasing ``(i // 10) % len(PHRASINGS)``,
    so every prefix of ten samples is balanced over digits. Generation seeds are distinct draws
    (fixed by ``seed``): calibration takes the even positions of one permutation, test the odd
    ones, so the two splits never share a (prompt, seed) pair, whatever their sizes.

    Returns:
        ``{"calibration": Split, "test": Split}`` with ``inputs = {"prompt": list[str],
        "seed": LongTensor (N,)}`` and ``labels`` the prompted digits.
    """
    pool = 1 << 16
    if max(calibration, test) > pool // 2:
        raise ValueError(f"at most {pool // 2} prompts per split")
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))
    splits = {}
    for name, count, offset in (("calibration", calibration, 0), ("test", test, 1)):
        index = torch.arange(count)
        digits = index % 10
        prompts = [prompt_for(int(d), int(i) // 10) for i, d in zip(index, digits, strict=True)]
        seeds = order[offset::2][:count].long()
        splits[name] = Split(name, {"prompt": prompts, "seed": seeds}, digits.long())
    return splits


def _prompt_words() -> list[str]:
    prompts = [prompt_for(d, p) for d in range(10) for p in range(len(PHRASINGS))]
    return sorted({word for prompt in prompts for word in prompt.split()})


def build_tokenizer(directory: Path | str) -> CLIPTokenizer:
    """A CLIP tokenizer for the prompt vocabulary, written to ``directory`` (no download).

    ``vocab.json`` holds CLIP's special tokens, single characters (letters, digits, punctuation;
    plain and word-final ``</w>``) and one whole-word token per prompt word; ``merges.txt`` builds
    each prompt word left to right. Other words fall back to characters, unknown characters to
    ``<|endoftext|>`` (CLIP's unknown token), which also pads. ``model_max_length`` is 16.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = [_START, _END, *_CHARACTERS, *(c + "</w>" for c in _CHARACTERS)]
    merges: list[tuple[str, str]] = []
    for word in _prompt_words():
        pieces = [*word[:-1], word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            if current not in tokens:
                tokens.append(current)
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n")
    lines = "".join(f"{left} {right}\n" for left, right in merges)
    (directory / "merges.txt").write_text("#version: 0.2\n" + lines)
    return CLIPTokenizer.from_pretrained(
        str(directory), model_max_length=MAX_TOKENS, local_files_only=True
    )
