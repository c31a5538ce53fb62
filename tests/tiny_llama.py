"""A tiny random Llama built from a config (no hub), shared by the text-generation tests."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab_size: int = 97, **config: int) -> LlamaForCausalLM:
    """Four decoder layers of width 32 (seeded weights), in eval mode."""
    torch.manual_seed(0)
    options = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **config,
    }
    return LlamaForCausalLM(LlamaConfig(**options)).eval()


def count_generate_calls(tiered: Any, monkeypatch: Any) -> list[int]:
    """A list that grows by one at each call of the user's model's own ``generate``."""
    calls: list[int] = []
    generate = tiered.base_model.generate
    monkeypatch.setattr(
        tiered.base_model, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k)
    )
    return calls
