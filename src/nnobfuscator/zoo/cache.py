"""Where trained demo models are cached: ``$NNOBF_HOME`` or ``~/.cache/nnobfuscator``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache directory (created on first use)."""
    root = os.environ.get("NNOBF_HOME") or Path.home() / ".cache" / "nnobfuscator"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
