"""A small CPU training loop with a progress bar (for the demo models)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nnobfuscator.zoo.digits import Split


def _shift(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translation of the whole batch by up to ``max_shift`` pixels (light augmentation)."""
    dx, dy = (torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def train_classifier(
    model: nn.Module,
    split: Split,
    *,
    epochs: int,
    lr: float,
    optimizer: str = "sgd",
    batch_size: int = 64,
    progress: bool = True,
    description: str = "training",
) -> float:
    """Train ``model`` in place with cross-entropy and a cosine schedule; returns seconds taken."""
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
    start = time.perf_counter()
    model.train()
    with tqdm(total=steps, desc=description, disable=not progress, unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(split), generator=generator)
            for begin in range(0, len(split), batch_size):
                index = order[begin : begin + batch_size]
                images = _shift(split.images[index], generator, max_shift)
                loss = F.cross_entropy(model(images), split.labels[index])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return time.perf_counter() - start


@torch.inference_mode()
def evaluate_accuracy(model: nn.Module, split: Split, batch_size: int = 256) -> float:
    """Top-1 accuracy of a plain model on a split."""
    model.eval()
    correct = 0
    for begin in range(0, len(split), batch_size):
        logits = model(split.images[begin : begin + batch_size])
        correct += int((logits.argmax(1) == split.labels[begin : begin + batch_size]).sum())
    return correct / len(split)
