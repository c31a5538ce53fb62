"""A picture of segmentation masks at every tier, side by side, for one or more test scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nnobfuscator.core.data import Split
from nnobfuscator.tasks import get_task
from nnobfuscator.tasks.figures import save_figure
from nnobfuscator.tiered.model import TieredModel


def _palette(classes: int) -> np.ndarray:
    import matplotlib

    colours = matplotlib.colormaps["tab20"](np.arange(max(classes - 1, 1)) % 20)[:, :3]
    return np.vstack([[0.0, 0.0, 0.0], colours])  # class 0 (background) black


@torch.inference_mode()
def plot_masks(model: TieredModel, split: Split, path: str | Path, scenes: int = 3) -> Path:
    """Write a PNG: per scene, the input, the ground truth and each tier's predicted mask.

    Each tier's panel is titled with its IoU-based score on that scene (mIoU over the classes
    present in the scene or its prediction).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = get_task(model.task)
    images, truth = split.images[:scenes], split.labels[:scenes]
    predictions = {
        name: task.logits(model(images, tier=name)).argmax(1) for name in model.tier_names
    }
    classes = int(max(truth.max(), *(p.max() for p in predictions.values()))) + 1
    palette = _palette(classes)
    columns = 2 + len(predictions)
    fig, axes = plt.subplots(
        len(images), columns, figsize=(2.2 * columns, 2.3 * len(images)), squeeze=False
    )
    for row in range(len(images)):
        panels = [("input", None), ("ground truth", truth[row])] + [
            (name, mask[row]) for name, mask in predictions.items()
        ]
        for col, (title, mask) in enumerate(panels):
            ax = axes[row][col]
            if mask is None:
                ax.imshow(images[row].mean(0).numpy(), cmap="gray")
            else:
                ax.imshow(palette[mask.numpy()], interpolation="nearest")
                if col > 1:
                    title = f"{title}\nIoU {100 * _scene_iou(mask, truth[row]):.0f}%"
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle(f"{model.model_name}: masks per tier (test scenes)", fontsize=10)
    from matplotlib.patches import Patch

    names = model.meta.get("classes") or [f"class {c}" for c in range(classes)]
    handles = [
        Patch(color=palette[c], label=names[c] if c < len(names) else f"class {c}")
        for c in range(classes)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(classes, 11), fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path, dpi=110)


def _scene_iou(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean IoU over the classes present in either mask of one scene."""
    ious = []
    for cls in torch.unique(torch.cat([predicted.flatten(), truth.flatten()])):
        p, t = predicted == cls, truth == cls
        ious.append(float((p & t).sum()) / float((p | t).sum()))
    return sum(ious) / len(ious)
