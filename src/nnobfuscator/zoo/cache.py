"""Where trained demo models are cached (see :func:`nnobfuscator.core.home.cache_dir`), and the quick
mode in which tests train them in seconds."""

from __future__ import annotations

import os

from nnobfuscator.core.home import cache_dir

__all__ = ["QUICK_ENV", "cache_dir", "quick"]

#: set to 1 to train demo models briefly (2 epochs on a share of their training data): for tests
#: of examples that load a demo model, never for figures
QUICK_ENV = "NNOBF_ZOO_QUICK"


def quick() -> bool:
    """Whether demo models train in quick mode (``NNOBF_ZOO_QUICK=1``)."""
    return os.environ.get(QUICK_ENV, "").strip() not in ("", "0")
