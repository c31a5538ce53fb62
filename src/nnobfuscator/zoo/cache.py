"""Where trained demo models are cached (see :func:`nnobfuscator.home.cache_dir`)."""

from nnobfuscator.home import cache_dir

__all__ = ["cache_dir"]
