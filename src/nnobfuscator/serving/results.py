"""Turn one sample's model output into an API answer, per task."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import numpy as np
import torch
from PIL import Image

from nnobfuscator.core.outputs import read_output
from nnobfuscator.serving.images import generated_png, mask_of, mask_png, mask_rle
from nnobfuscator.serving.schemas import (
    ClassifyResponse,
    GenerateResponse,
    MaskRle,
    ScoredLabel,
    SegmentResponse,
)
from nnobfuscator.serving.served_model import ServedModel

CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"
TEXT_TO_IMAGE = {"text-to-image", "text_to_image", "text2image"}


def classify_answer(
    served: ServedModel, output: Any, tier: str, top_k: int, *, owner: bool = False
) -> ClassifyResponse:
    """Label and top-k softmax scores from one sample's logits (tensor or ``{"out": ...}``),
    no more than ``tier``'s answer format allows (an owner's comparison shows everything)."""
    logits = read_output(output)
    if logits.dim() != 1:
        raise TypeError("a classifier must return logits (N, classes) or {'out': (N, classes)}")
    probs = torch.softmax(logits.float(), dim=0)
    answer_format = None if owner else served.model.get_tier(tier).format
    if answer_format is not None:
        top_k = min(top_k, answer_format.max_classes(probs.numel()))
    scores, indices = probs.topk(min(top_k, probs.numel()))
    with_scores = answer_format is None or answer_format.has_scores
    ranked = [
        ScoredLabel(
            label=served.label(int(i)), index=int(i), score=float(s) if with_scores else None
        )
        for s, i in zip(scores, indices, strict=True)
    ]
    best = ranked[0]
    return ClassifyResponse(
        tier=tier,
        label=best.label,
        index=best.index,
        score=best.score,
        top_k=ranked,
        answer_format=answer_format.spec if answer_format is not None else "scores",
    )


def segment_answer(
    served: ServedModel, output: Any, tier: str, size: tuple[int, int], fmt: str
) -> SegmentResponse:
    """A class mask at the uploaded image's ``size`` (width, height), as PNG or RLE."""
    mask = mask_of(output).to(torch.int32).cpu().numpy()
    if (mask.shape[1], mask.shape[0]) != size:
        dtype = np.int32 if mask.max(initial=0) > 255 else np.uint8
        resized = Image.fromarray(mask.astype(dtype))
        mask = np.asarray(resized.resize(size, Image.Resampling.NEAREST)).astype(np.int32)
    classes = sorted(int(c) for c in np.unique(mask))
    answer = SegmentResponse(
        tier=tier,
        width=size[0],
        height=size[1],
        classes=classes,
        labels=[served.label(c) for c in classes],
        format="rle" if fmt == "rle" else "png",
    )
    if fmt == "rle":
        answer.rle = MaskRle(**mask_rle(mask))
    else:
        answer.mask = base64.b64encode(mask_png(mask)).decode()
    return answer


def generate_answer(
    output: Any, tier: str, prompt: str, seed: int | None = None
) -> GenerateResponse:
    """One generated image as base64 PNG."""
    image = base64.b64encode(generated_png(output)).decode()
    return GenerateResponse(tier=tier, prompt=prompt, seed=seed, image=image)


def derived_seed(key_id: str, prompt: str) -> int:
    """The seed of a request that sends none: fixed by the key and the prompt."""
    digest = hashlib.sha256(f"{key_id}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
