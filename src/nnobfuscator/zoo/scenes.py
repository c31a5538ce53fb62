"""Digit scenes: a small offline segmentation dataset built from scikit-learn's digits.

Each scene is a square canvas with two or three handwritten digits pasted at random positions and
scales; every pixel is labelled with its digit's class + 1, or 0 for background (11 classes).
Train, calibration and test scenes are drawn from disjoint digit images (the same stratified split
as :func:`~nnobfuscator.zoo.digits.digits_splits`), with fixed seeds: generation is deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nnobfuscator.zoo.digits import Split, digit_split_indices

SCENE_CLASSES = ["background"] + [str(i) for i in range(10)]
SCENE_COUNTS = {"train": 600, "calibration": 300, "test": 300}
_MEAN, _STD = 0.12, 0.235
_INK = 0.35  # a pixel belongs to a digit where its intensity exceeds this


def digit_scenes(
    canvas: int = 48, counts: dict[str, int] | None = None, seed: int = 0
) -> dict[str, Split]:
    """Train / calibration / test splits of digit scenes.

    Args:
        canvas: side of the square scenes in pixels (digits are scaled to 30-45% of it).
        counts: scenes per split (default ``SCENE_COUNTS``).
        seed: fixes the digit split and every placement.

    Returns:
        Splits whose ``images`` are ``(N, 1, canvas, canvas)`` normalised floats and whose
        ``labels`` are ``(N, canvas, canvas)`` class indices.
    """
    from sklearn.datasets import load_digits

    if canvas < 12:
        raise ValueError(f"canvas must be at least 12 pixels, got {canvas}")
    data = load_digits()
    digits = torch.tensor(data.images / 16.0, dtype=torch.float32)
    indices = digit_split_indices(data.target, seed)
    counts = {**SCENE_COUNTS, **(counts or {})}
    splits = {}
    for offset, (name, pool) in enumerate(indices.items()):
        generator = torch.Generator().manual_seed(seed * 1000 + offset)
        images, labels = _compose(
            digits[pool], torch.as_tensor(data.target[pool]), counts[name], canvas, generator
        )
        splits[name] = Split(name, (images - _MEAN) / _STD, labels)
    return splits


def _compose(
    digits: torch.Tensor, targets: torch.Tensor, count: int, canvas: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.zeros(count, 1, canvas, canvas)
    labels = torch.zeros(count, canvas, canvas, dtype=torch.long)
    low, high = max(6, round(0.3 * canvas)), max(7, round(0.45 * canvas))
    for scene in range(count):
        for _ in range(int(torch.randint(2, 4, (1,), generator=generator))):
            pick = int(torch.randint(len(digits), (1,), generator=generator))
            size = int(torch.randint(low, high + 1, (1,), generator=generator))
            top, left = (
                int(v) for v in torch.randint(canvas - size + 1, (2,), generator=generator)
            )
            glyph = F.interpolate(
                digits[pick][None, None], size=(size, size), mode="bilinear", align_corners=False
            )[0, 0].clamp(0, 1)
            window = (slice(top, top + size), slice(left, left + size))
            images[scene, 0][window] = torch.maximum(images[scene, 0][window], glyph)
            labels[scene][window] = torch.where(
                glyph > _INK, int(targets[pick]) + 1, labels[scene][window]
            )
    noise = 0.05 * torch.randn(images.shape, generator=generator)
    return (images + noise).clamp(0, 1), labels


def scene_palette() -> np.ndarray:
    """An RGB colour per class (background black), for mask pictures."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"](np.arange(10))[:, :3]
    return np.vstack([[0.0, 0.0, 0.0], colours])
