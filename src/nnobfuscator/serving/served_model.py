"""Rebuild a served model from an artifact directory, and read how its inputs are prepared."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnobfuscator.serving.images import ImageSpec
from nnobfuscator.tiered.model import TieredModel


@dataclass
class ServedModel:
    """A tiered model plus what the server needs to feed it and read its answers.

    Args:
        model: the tiered model (eval mode).
        image_spec: how an uploaded image becomes one input (image tasks).
        labels: class names by index (classification, segmentation), or ``None``.
        tokenizer: a ``transformers`` tokenizer (text generation: prompts in, text out, chat
            template), or ``None``.
    """

    model: TieredModel
    image_spec: ImageSpec
    labels: list[str] | None = None
    tokenizer: Any = None

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def takes_seed(self) -> bool:
        """Whether the model draws from a seed per sample (a diffusion pipeline)."""
        forward = getattr(self.model.base_model, "forward", None)
        return forward is not None and "seed" in inspect.signature(forward).parameters

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a generated text: the tokenizer's and the model's."""
        base = self.model.base_model
        ids: set[int] = set()
        for source in (self.tokenizer, getattr(base, "generation_config", None), base.config):
            value = getattr(source, "eos_token_id", None)
            ids.update(
                value if isinstance(value, list | tuple) else [] if value is None else [value]
            )
        return sorted(int(i) for i in ids)

    @property
    def pad_token_id(self) -> int:
        """The id prompts are left-padded with (the tokenizer's, the model's, else an end id)."""
        base = self.model.base_model
        for source in (self.tokenizer, getattr(base, "generation_config", None), base.config):
            value = getattr(source, "pad_token_id", None)
            if isinstance(value, int):
                return value
        return (self.eos_token_ids or [0])[0]

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt plus completion) the model attends to, if it says."""
        value = getattr(
            getattr(self.model.base_model, "config", None), "max_position_embeddings", None
        )
        return int(value) if isinstance(value, int) and value > 0 else None

    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return str(index)


#: where a text-generation artifact keeps its tokenizer (``tokenizer.save_pretrained``)
TOKENIZER_FOLDER = "tokenizer"


def load_artifact(directory: str | Path) -> ServedModel:
    """Load an artifact the way ``nnobf eval`` does: base model from its stored source, then
    tiers; and its tokenizer from ``<artifact>/tokenizer`` when that folder exists (offline).

    Raises:
        ValueError: the artifact is missing or corrupt, or does not record its model source.
    """
    from nnobfuscator.core.serialization import read_config
    from nnobfuscator.jobs.sources import load_base_model

    config = read_config(directory)
    source = config.get("meta", {}).get("source")
    if not source or "model" not in source:
        raise ValueError(
            f"{directory} does not record where its base model comes from; build the app in "
            "Python instead: create_app(TieredModel.from_pretrained(dir, model))"
        )
    base, _ = load_base_model(source["model"], progress=False)
    model = TieredModel.from_pretrained(str(directory), base)
    return serve_model(model, tokenizer=load_tokenizer(directory))


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer saved in ``<directory>/tokenizer``, or ``None`` when there is none."""
    folder = Path(directory) / TOKENIZER_FOLDER
    if not folder.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def serve_model(
    model: TieredModel, *, labels: list[str] | None = None, tokenizer: Any = None
) -> ServedModel:
    """Wrap an in-memory tiered model for serving (puts it in eval mode). Its preprocessing and
    class names come from its ``meta`` (``preprocessing``, ``classes``), written when it was
    calibrated from a data source; a model without them takes images at its input size,
    normalised with ImageNet's statistics. A text-generation model needs its ``tokenizer`` for
    ``/v1/completions`` and ``/v1/chat/completions``."""
    model.eval()
    classes = model.meta.get("classes")
    return ServedModel(
        model,
        image_spec(model),
        labels or ([str(c) for c in classes] if classes else None),
        tokenizer,
    )


def image_spec(model: TieredModel) -> ImageSpec:
    """How an uploaded image becomes one input: the artifact's ``meta["preprocessing"]``, else
    the model's input check with ImageNet defaults."""
    stored = model.meta.get("preprocessing") or {}
    spec = model.input_spec
    channels = int(stored.get("channels") or (spec.channels if spec else None) or 3)
    size = stored.get("size")
    if size is None and spec is not None and spec.height and spec.width:
        size = (spec.height, spec.width)
    defaults = ImageSpec(channels)
    mean = tuple(stored.get("mean", defaults.mean))
    std = tuple(stored.get("std", defaults.std))
    if channels == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return ImageSpec(
        channels,
        tuple(size) if size else None,
        mean,
        std,
        crop=bool(stored.get("crop", model.task == "classification")),
    )
