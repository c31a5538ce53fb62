"""Offline demo data and models: nothing here downloads."""

from nnobfuscator.zoo.cache import cache_dir
from nnobfuscator.zoo.classifiers import (
    build_classifier,
    build_model,
    list_models,
    load_zoo_classifier,
    load_zoo_model,
)
from nnobfuscator.zoo.digits import DIGITS_CLASSES, Split, digits_splits
from nnobfuscator.zoo.scenes import SCENE_CLASSES, digit_scenes

__all__ = [
    "DIGITS_CLASSES",
    "SCENE_CLASSES",
    "Split",
    "build_classifier",
    "build_model",
    "cache_dir",
    "digit_scenes",
    "digits_splits",
    "list_models",
    "load_zoo_classifier",
    "load_zoo_model",
]
