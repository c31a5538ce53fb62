"""English text that installs with the machine: the Python documentation's reST sources.

Debian's ``python3-doc`` installs them under ``/usr/share/doc/python3.X/html/_sources/`` (about 500
files of plain English prose about Python, with reST markup; ``NNOBF_PYTHON_DOCS`` points
elsewhere). Text the model may well have seen in training, as most web text is; what the tiers
are measured on is the *same* text at every tier, so a tier's loss against the full model is what
counts.

Calibration and test passages come from disjoint documents: each document goes to one split by a
digest of its path, and each split takes one window of ``window`` tokens from each of its first
documents (in digest order), so the passages cover many topics. Markup lines (directives,
section underlines, comments) are dropped; prose and code examples stay.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nnobfuscator.core.data import Split
from nnobfuscator.tasks.text_generation import next_token_labels

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["python_docs_available", "python_docs_folder", "python_docs_splits"]

ENV = "NNOBF_PYTHON_DOCS"
_MARKUP = re.compile(r"^\s*(\.\. |[=\-~^\"'`#*+<>]{3,}\s*$|:[a-z]+:)")
_MIN_CHARACTERS = 2_000


def python_docs_folder() -> Path | None:
    """The folder of ``*.rst.txt`` sources (``$NNOBF_PYTHON_DOCS``, else python3-doc's)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    found = sorted(Path("/usr/share/doc").glob("python3*/html/_sources"))
    return found[-1] if found else None


def python_docs_available() -> bool:
    folder = python_docs_folder()
    return folder is not None and any(folder.rglob("*.rst.txt"))


def _clean(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines() if not _MARKUP.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _documents(folder: Path) -> list[tuple[str, str]]:
    """``(digest, text)`` of every long enough document, in digest order."""
    documents = []
    for path in folder.rglob("*.rst.txt"):
        text = _clean(path.read_text(errors="replace"))
        if len(text) >= _MIN_CHARACTERS:
            relative = path.relative_to(folder).as_posix()
            documents.append((hashlib.sha256(relative.encode()).hexdigest(), text))
    return sorted(documents)


def python_docs_splits(
    tokenizer: PreTrainedTokenizerBase,
    window: int = 256,
    calibration: int = 24,
    test: int = 24,
) -> dict[str, Split]:
    """Calibration and test splits of ``window``-token passages from disjoint documents.

    Returns:
        ``{"calibration": Split, "test": Split}``, inputs ``{"input_ids", "attention_mask"}``
        ``(N, window)``, labels the next tokens ``(N, window - 1)``.

    Raises:
        FileNotFoundError: the sources are not installed (the message says how).
    """
    folder = python_docs_folder()
    if folder is None or not python_docs_available():
        raise FileNotFoundError(
            "the Python documentation sources are not installed: `apt-get install python3-doc` "
            f"(or set {ENV} to a folder of *.rst.txt files)"
        )
    wanted = {"calibration": calibration, "test": test}
    windows: dict[str, list[list[int]]] = {name: [] for name in wanted}
    for digest, text in _documents(folder):
        name = "calibration" if int(digest[-1], 16) % 2 == 0 else "test"
        if len(windows[name]) >= wanted[name]:
            if all(len(windows[n]) >= wanted[n] for n in wanted):
                break
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= window:
            windows[name].append(ids[:window])
    splits = {}
    for name, rows in windows.items():
        if len(rows) < wanted[name]:
            raise ValueError(f"only {len(rows)} documents of {window} tokens for {name}")
        ids = torch.tensor(rows, dtype=torch.long)
        mask = torch.ones_like(ids)
        inputs = {"input_ids": ids, "attention_mask": mask}
        splits[name] = Split(name, inputs, next_token_labels(ids, mask))
    return splits
