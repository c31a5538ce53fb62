"""The HTTP service: API key -> tier, key store, micro-batching, web page, Ray Serve.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client); imported on first use, so
``import nnobfuscator`` and ``nnobf keys`` never load the HTTP stack.

Example:
    >>> from nnobfuscator.serving import create_app
    >>> app = create_app("runs/resnet18-feature-mix", keys="keys.sqlite")
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "create_app": "nnobfuscator.serving.app",
    "RateLimit": "nnobfuscator.serving.config",
    "ServeConfig": "nnobfuscator.serving.config",
    "ApiKey": "nnobfuscator.serving.api_keys",
    "KeyStore": "nnobfuscator.serving.api_keys",
    "KeyStoreError": "nnobfuscator.serving.api_keys",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nnobfuscator.serving' has no attribute {name!r}")
    try:
        module = import_module(_EXPORTS[name])
    except ModuleNotFoundError as err:
        raise ImportError(
            f"nnobfuscator.serving.{name} needs the serving extra ({err.name} is missing): "
            "pip install 'nnobfuscator[serve]'"
        ) from err
    return getattr(module, name)
