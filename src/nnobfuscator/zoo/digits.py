"""scikit-learn's handwritten digits (ships with the package) as fixed image splits."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nnobfuscator.core.data import Split

__all__ = ["DIGITS_CLASSES", "Split", "digit_split_indices", "digits_splits"]

DIGITS_CLASSES = [str(i) for i in range(10)]
_SPLIT_SIZES = {"train": 900, "calibration": 448}  # the rest (449 images) is the test split
_MEAN, _STD = 0.30, 0.38


def digit_split_indices(targets: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Stratified train / calibration / test indices into the 1,797 digits (fixed by ``seed``)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(targets))
    train, rest = train_test_split(
        index, train_size=_SPLIT_SIZES["train"], stratify=targets, random_state=seed
    )
    calibration, test = train_test_split(
        rest, train_size=_SPLIT_SIZES["calibration"], stratify=targets[rest], random_state=seed
    )
    return {"train": train, "calibration": calibration, "test": test}


def digits_splits(image_size: int = 16, seed: int = 0) -> dict[str, Split]:
    """Train / calibration / test splits of the 1,797 8x8 digits, resized to ``image_size``.

    The split is stratified and fixed by ``seed``; pixels are scaled to [0, 1] then normalised.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    if image_size != 8:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    images = (images - _MEAN) / _STD
    labels = torch.tensor(data.target, dtype=torch.long)
    return {
        name: Split(name, images[torch.as_tensor(idx)], labels[torch.as_tensor(idx)])
        for name, idx in digit_split_indices(data.target, seed).items()
    }
