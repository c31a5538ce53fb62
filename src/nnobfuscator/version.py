"""The library version, stamped into every artifact and report."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nnobfuscator")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"
