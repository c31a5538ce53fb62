"""A picture of generated images at every tier: one row per tier, one column per prompted class."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from nnobfuscator.core.data import Split
from nnobfuscator.core.outputs import read_images, select
from nnobfuscator.tasks.figures import save_figure
from nnobfuscator.tiered.model import TieredModel


def first_of_each_class(split: Split, columns: int = 10) -> torch.Tensor:
    """Indices of the first sample of each class, in class order (no picking of good ones)."""
    firsts: dict[int, int] = {}
    for index, label in enumerate(split.labels.tolist()):
        firsts.setdefault(int(label), index)
    return torch.tensor([firsts[label] for label in sorted(firsts)][:columns])


@torch.inference_mode()
def plot_generation_grid(model: TieredModel, split: Split, path: str | Path) -> Path:
    """Write a PNG: each tier's images (rows, lowest tier first) for the first test prompt of
    each class (columns), with the same seeds in every row; rows are labelled with the tier's
    test metric and relative cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = first_of_each_class(split)
    inputs = select(split.inputs, index)
    prompts = inputs["prompt"] if isinstance(inputs, dict) else list(inputs)
    rows = {name: read_images(model(inputs, tier=name)) for name in model.tier_names}
    fig, axes = plt.subplots(
        len(rows),
        len(index),
        figsize=(1.25 * len(index) + 1.2, 1.45 * len(rows) + 0.6),
        squeeze=False,
    )
    for row, (name, images) in enumerate(rows.items()):
        tier = model.tiers[name]
        test = tier.metrics.get("test")
        label = name + (f"\n{100 * test:.0f}%" if test is not None else "")
        label += f"\ncost {tier.relative_cost:.2f}"
        for col in range(len(index)):
            ax = axes[row][col]
            ax.imshow(images[col].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("\n".join(textwrap.wrap(prompts[col], 14)), fontsize=7)
            if col == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(
        f"{model.model_name}: one row per tier (lowest first), first test prompt of each class",
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, path)
