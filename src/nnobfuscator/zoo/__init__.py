"""Offline demo data and models: nothing here downloads."""

from nnobfuscator.zoo.cache import cache_dir
from nnobfuscator.zoo.classifiers import build_classifier, list_models, load_zoo_classifier
from nnobfuscator.zoo.digits import DIGITS_CLASSES, Split, digits_splits

__all__ = [
    "DIGITS_CLASSES",
    "Split",
    "build_classifier",
    "cache_dir",
    "digits_splits",
    "list_models",
    "load_zoo_classifier",
]
