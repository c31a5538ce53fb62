"""An independent judge for generated digits: a small CNN trained on real digits only, cached.

It scores the demo text-to-image model (:mod:`nnobfuscator.zoo.text_to_image`): its input is what
the pipeline returns with ``output_type="pt"``, ``(N, 3, H, W)`` floats in [0, 1].
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nnobfuscator.zoo import classifiers
from nnobfuscator.zoo.cache import cache_dir
from nnobfuscator.zoo.digits import Split, digit_split_indices
from nnobfuscator.zoo.training import evaluate_accuracy, train_model

__all__ = ["DigitJudge", "judge_recipe", "load_judge", "real_digits"]

JUDGE_IMAGE_SIZE = 16
_MEAN, _STD = 0.30, 0.38  # of the digits' [0, 1] pixels (as in nnobfuscator.zoo.digits)


def judge_recipe() -> dict[str, Any]:
    """Everything that decides the judge's trained weights (stored with them)."""
    return {
        "builder": "DigitJudge/r1",
        "image_size": JUDGE_IMAGE_SIZE,
        "epochs": 30,
        "lr": 3e-3,
        "optimizer": "adamw",
        "batch_size": 64,
        "seed": 0,
        "threads": classifiers.TRAIN_THREADS,
    }


def real_digits(image_size: int = JUDGE_IMAGE_SIZE, seed: int = 0) -> dict[str, Split]:
    """The digits splits of :func:`~nnobfuscator.zoo.digits.digit_split_indices` as RGB images.

    Images are ``(N, 3, image_size, image_size)`` floats in [0, 1] (grey repeated, resized
    bilinearly from 8x8), the format of a diffusers pipeline's ``output_type="pt"``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    if image_size != 8:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    images = images.clamp(0, 1).repeat(1, 3, 1, 1)
    labels = torch.tensor(data.target, dtype=torch.long)
    return {
        name: Split(name, images[torch.as_tensor(idx)], labels[torch.as_tensor(idx)])
        for name, idx in digit_split_indices(data.target, seed).items()
    }


class DigitJudge(nn.Module):
    """A small CNN digits classifier for ``(N, 3, H, W)`` images in [0, 1].

    Images are turned grey and normalised inside. ``features`` gives the penultimate features
    ``(N, 128)``, ``head`` the logits ``(N, 10)`` from them.
    """

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(64 * 16, self.feature_dim),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.feature_dim, 10))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, 128)`` of images ``(N, C, H, W)`` in [0, 1]."""
        grey = images.float().mean(dim=1, keepdim=True)
        if grey.shape[-2:] != (JUDGE_IMAGE_SIZE, JUDGE_IMAGE_SIZE):
            grey = F.interpolate(grey, size=(JUDGE_IMAGE_SIZE, JUDGE_IMAGE_SIZE), mode="bilinear")
        return self.body((grey - _MEAN) / _STD)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Digit logits ``(N, 10)`` from :meth:`features`."""
        return self.classifier(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_judge(progress: bool = True, *, retrain: bool = False) -> DigitJudge:
    """The judge trained on the real digits train split: from the cache, or trained now (seconds).

    The info (test accuracy on real digits, training time) is stored next to the weights, in
    ``judge-digits-<digest>.json`` of :func:`~nnobfuscator.zoo.cache.cache_dir`.

    Returns:
        The judge in eval mode, without gradients.
    """
    recipe = judge_recipe()
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    stem = cache_dir() / f"judge-digits-{digest}"
    weights_path, info_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    judge = DigitJudge()
    if weights_path.is_file() and info_path.is_file() and not retrain:
        judge.load_state_dict(load_file(str(weights_path)))
        return judge.eval().requires_grad_(False)
    splits = real_digits(recipe["image_size"])
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe["threads"])
    try:
        torch.manual_seed(recipe["seed"])
        judge = DigitJudge()
        seconds = train_model(
            judge,
            splits["train"],
            epochs=recipe["epochs"],
            lr=recipe["lr"],
            optimizer=recipe["optimizer"],
            batch_size=recipe["batch_size"],
            progress=progress,
            description="training the digits judge (once; cached)",
        )
        accuracy = evaluate_accuracy(judge, splits["test"])
    finally:
        torch.set_num_threads(threads)
    info = {
        "model": "digit-judge",
        "dataset": "digits",
        "recipe": recipe,
        "torch": torch.__version__,
        "train_seconds": round(seconds, 1),
        "test_accuracy": accuracy,
    }
    tmp = weights_path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(tmp))
    tmp.replace(weights_path)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return judge.eval().requires_grad_(False)
