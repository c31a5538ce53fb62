"""Each tier's answers to the same prompts, side by side (a Markdown page): what a language
model's tiers are worth, read rather than measured."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from nnobfuscator.tiered.model import TieredModel


@torch.inference_mode()
def tier_answers(
    model: TieredModel,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
) -> dict[str, list[str]]:
    """Greedy answers per tier to chat ``prompts``: every prompt at every tier in ONE
    ``generate`` call (a batch mixing tiers)."""
    tiers = model.tier_names
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        for prompt in prompts
    ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # answers start at the same column
    try:
        batch = tokenizer(chats * len(tiers), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    rows = [tier for tier in tiers for _ in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        **batch, tiers=rows, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
    )
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return {
        tier: [texts[i * len(prompts) + j].strip() for j in range(len(prompts))]
        for i, tier in enumerate(tiers)
    }


def write_answers(answers: dict[str, list[str]], prompts: Sequence[str], path: str | Path) -> Path:
    """A Markdown table: one row per prompt, one column per tier."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>") or "(nothing)"

    tiers = list(answers)
    lines = [
        "# Each tier's answers to the same prompts",
        "",
        "Greedy decoding; every prompt at every tier in one batch (`generate(..., tiers=[...])`).",
        "",
        "| prompt | " + " | ".join(tiers) + " |",
        "|---|" + "---|" * len(tiers),
    ]
    for j, prompt in enumerate(prompts):
        lines.append(f"| {cell(prompt)} | " + " | ".join(cell(answers[t][j]) for t in tiers) + " |")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
