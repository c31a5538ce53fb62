"""Offline demo data and models: nothing here downloads."""

from __future__ import annotations

from typing import Any

from nnobfuscator.zoo import classifiers
from nnobfuscator.zoo.cache import cache_dir
from nnobfuscator.zoo.classifiers import build_classifier, build_model, load_zoo_classifier
from nnobfuscator.zoo.digits import DIGITS_CLASSES, Split, digits_splits
from nnobfuscator.zoo.fashion import FASHION_CLASSES, fashion_mnist_splits
from nnobfuscator.zoo.scenes import SCENE_CLASSES, digit_scenes

#: the zoo's text-to-image pipelines (diffusers), by name
PIPELINES = {"sd-digits": "text-to-image"}
#: the zoo's language models (read from installed files, never trained here), by name
LANGUAGE_MODELS = {"smollm2": "text-generation"}

__all__ = [
    "DIGITS_CLASSES",
    "FASHION_CLASSES",
    "LANGUAGE_MODELS",
    "PIPELINES",
    "SCENE_CLASSES",
    "Split",
    "build_classifier",
    "build_model",
    "cache_dir",
    "digit_scenes",
    "digits_splits",
    "fashion_mnist_splits",
    "list_models",
    "load_zoo_classifier",
    "load_zoo_model",
]


def list_models(task: str | None = None) -> list[str]:
    """Names of the demo models (of one task, when given)."""
    others = {**PIPELINES, **LANGUAGE_MODELS}
    named = [name for name, kind in others.items() if task in (None, kind)]
    return sorted(classifiers.list_models(task) + named)


def load_zoo_model(name: str, *, progress: bool = True, **options: Any) -> tuple[Any, dict]:
    """A demo model trained once and cached (a torchvision model, a diffusers pipeline), or the
    language model the machine's packages ship (SmolLM2)."""
    if name in LANGUAGE_MODELS:
        from nnobfuscator.zoo.language import SMOLLM2_GGUF, load_smollm2

        model, _ = load_smollm2()
        return model, {"model": "SmolLM2-135M-Instruct", "file": SMOLLM2_GGUF}
    if name in PIPELINES:
        from nnobfuscator.zoo.text_to_image import DEFAULT_CALL, load_zoo_pipeline

        pipeline, info = load_zoo_pipeline(progress=progress)
        return pipeline, {**info, "call": dict(DEFAULT_CALL)}
    return classifiers.load_zoo_model(name, progress=progress, **options)
