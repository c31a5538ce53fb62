"""A tiny random Llama built from a config (no hub), shared by the text-generation tests."""

from __future__ import annotations

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
