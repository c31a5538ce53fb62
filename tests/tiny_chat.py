"""A tiny chat model built offline (no hub), shared by the serving tests of text generation: a
word-level tokenizer over the tiny Llama's ids with a chat template, tiers of the tiny Llama that
continue a prompt differently, and what ``TieredModel.generate`` answers at a tier."""

from __future__ import annotations

import json

import torch
from tiny_llama import tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nnobfuscator import TieredModel, obfuscate

VOCAB = 97
END = 2  # the end token
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny Llama's 97 ids (``w0`` ...), with a chat template."""
    words = SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.decoder = decoders.WordPiece()  # joins words with spaces
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, **names)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiered_lm(task: str = "text-generation") -> TieredModel:
    """Tiers free (two layers skipped), pro (one) and premium of the tiny Llama."""
    tiered = obfuscate(
        tiny_llama(pad_token_id=0, bos_token_id=1, eos_token_id=END),
        tiers="free=0.5,pro=0.8,premium=full",
        strategy="none",
        compute="block-skip",
        key=b"s" * 32,
        task=task,
        model_name="tiny-llama",
    )
    tiered.set_setting("free", "block-skip", {"skip": ["model.layers.1", "model.layers.2"]})
    tiered.set_setting("pro", "block-skip", {"skip": ["model.layers.3"]})
    return tiered


def reference(
    tiered: TieredModel, tokenizer, ids: list[int], tier: str, max_new_tokens: int = 8, **options
) -> tuple[str, str]:
    """``TieredModel.generate`` at ``tier`` for one prompt, decoded as the server decodes: the
    text (up to the end token) and its finish reason."""
    prompt = torch.tensor([ids])
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, **options}
    with torch.inference_mode():
        out = tiered.generate(prompt, attention_mask=torch.ones_like(prompt), tier=tier, **options)
    new = out[0, len(ids) :].tolist()
    finish = "stop" if END in new else "length"
    new = new[: new.index(END)] if END in new else new
    return tokenizer.decode(new, skip_special_tokens=True), finish


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A conversation's prompt ids, as the server builds them."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def events(lines) -> list[dict | str]:
    """The ``data:`` payloads of a server-sent event stream (``[DONE]`` as the string)."""
    out: list[dict | str] = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
