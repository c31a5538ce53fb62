"""The project's home directory: ``$NNOBF_HOME`` or ``~/.cache/nnobfuscator`` (demo models, keys)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache directory (created on first use)."""
    root = os.environ.get("NNOBF_HOME") or Path.home() / ".cache" / "nnobfuscator"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
