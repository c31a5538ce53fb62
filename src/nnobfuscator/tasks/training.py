"""A small CPU training loop with a progress bar, and BatchNorm re-estimation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nnobfuscator.core.data import Split

if TYPE_CHECKING:
    from nnobfuscator.tasks import Task


def _shift(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, max_shift: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random translation of the whole batch by up to ``max_shift`` pixels (light augmentation).

    Per-pixel labels (``(N, H, W)``) move with their images.
    """
    dx, dy = (torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)).tolist()
    images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    if labels.dim() == 3:
        labels = torch.roll(labels, shifts=(dy, dx), dims=(1, 2))
    return images, labels


def _flip_half(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images left to right."""
    mask = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(mask.view(-1, *([1] * (images.dim() - 1))), images.flip(-1), images)


def train_model(
    model: nn.Module,
    split: Split,
    *,
    epochs: int,
    lr: float,
    optimizer: str = "sgd",
    batch_size: int = 64,
    read_logits: Callable[[Any], torch.Tensor] | None = None,
    progress: bool = True,
    description: str = "training",
    flips: bool = False,
    label_smoothing: float = 0.0,
) -> float:
    """Train ``model`` in place with cross-entropy and a one-cycle schedule; returns seconds.

    Labels are class indices per sample (classification) or per pixel (segmentation; shifted
    along with the images, and classes weighted by inverse square-root frequency so that a small
    foreground is not drowned by the background), or class probabilities ``(N, C)`` (soft
    targets, e.g. a teacher's scores). ``read_logits`` turns model outputs (e.g. torchvision's
    ``{"out": ...}``) into logits. ``flips``: mirror a random half of each batch left to right
    (for data whose meaning a mirror image keeps: clothes, not digits).
    """
    generator = torch.Generator().manual_seed(0)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(split) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    max_shift = max(1, split.images.shape[-1] // 16)
    weight = _class_weights(split.labels) if split.labels.dim() == 3 else None
    start = time.perf_counter()
    model.train()
    with tqdm(total=steps, desc=description, disable=not progress, unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(split), generator=generator)
            for begin in range(0, len(split), batch_size):
                index = order[begin : begin + batch_size]
                images, labels = _shift(
                    split.images[index], split.labels[index], generator, max_shift
                )
                if flips:
                    images = _flip_half(images, generator)
                output = model(images)
                logits = read_logits(output) if read_logits else output
                loss = F.cross_entropy(
                    logits, labels, weight=weight, label_smoothing=label_smoothing
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return time.perf_counter() - start


train_classifier = train_model


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256
) -> nn.Module:
    """Re-estimate the BatchNorm running statistics of ``model`` on ``images``; returns it in eval.

    A short training with a small BN momentum (MobileNetV3 uses 0.01) leaves running statistics
    that still lag behind the trained weights. They are reset and recomputed as the cumulative
    average (``momentum=None``) of the batch statistics over ``images``, forwarded in train mode
    in near-equal batches of at most ``batch_size``; no parameter is updated. The momenta are
    then restored. Models without BatchNorm are left as they are (and put in eval mode).
    """
    norms = [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    ]
    momenta = [norm.momentum for norm in norms]
    if norms and len(images):
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        model.train()
        try:
            for batch in torch.tensor_split(images, math.ceil(len(images) / batch_size)):
                model(batch)
        finally:
            for norm, momentum in zip(norms, momenta, strict=True):
                norm.momentum = momentum
    return model.eval()


def _class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Inverse square-root class frequencies, normalised to mean 1."""
    counts = torch.bincount(labels.flatten()).float().clamp_min(1)
    weights = counts.rsqrt()
    return weights * len(weights) / weights.sum()


def evaluate_metric(model: nn.Module, split: Split, task: Task, batch_size: int = 128) -> float:
    """A plain model's task metric on a split."""
    return task.measure(model, split.images, split.labels, batch_size)


@torch.inference_mode()
def evaluate_accuracy(model: nn.Module, split: Split, batch_size: int = 256) -> float:
    """Top-1 accuracy of a plain model on a split."""
    model.eval()
    correct = 0
    for begin in range(0, len(split), batch_size):
        logits = model(split.images[begin : begin + batch_size])
        correct += int((logits.argmax(1) == split.labels[begin : begin + batch_size]).sum())
    return correct / len(split)
