"""The HTTP service: API key -> tier, key store, micro-batching, web page, Ray Serve.

Example:
    >>> from nnobfuscator.serving import create_app
    >>> app = create_app("runs/resnet18-feature-mix", keys="keys.sqlite")
"""

from nnobfuscator.serving.app import create_app
from nnobfuscator.serving.config import RateLimit, ServeConfig
from nnobfuscator.serving.keystore import ApiKey, KeyStore, KeyStoreError

__all__ = ["ApiKey", "KeyStore", "KeyStoreError", "RateLimit", "ServeConfig", "create_app"]
