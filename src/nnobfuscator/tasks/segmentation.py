"""Semantic segmentation: mean intersection-over-union via torchmetrics.

``miou`` is the macro average over all classes (background included) of each class's IoU, with
intersections and unions accumulated over every pixel of the split. Pixels labelled 255 (Pascal
VOC's "void") are ignored; digit scenes label every pixel. Classes absent from both prediction and
ground truth count as 0.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_jaccard_index

from nnobfuscator.tasks.base import Task, register_task


@register_task
class SegmentationTask(Task):
    """mIoU; ``extra`` holds per-class IoU, pixel accuracy and agreement with the full model."""

    name = "segmentation"
    metric = "miou"
    ignore_index = 255

    def _check(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if logits.dim() != 4 or targets.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"segmentation needs logits (N, C, H, W) and masks (N, H, W); got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}"
            )

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        self._check(logits, targets)
        return float(
            multiclass_jaccard_index(
                logits.argmax(1),
                targets,
                num_classes=logits.shape[1],
                average="macro",
                ignore_index=self.ignore_index,
            )
        )

    def extra(
        self, logits: torch.Tensor, targets: torch.Tensor, full_logits: torch.Tensor
    ) -> dict[str, float]:
        self._check(logits, targets)
        predicted = logits.argmax(1)
        per_class = multiclass_jaccard_index(
            predicted,
            targets,
            num_classes=logits.shape[1],
            average="none",
            ignore_index=self.ignore_index,
        )
        valid = targets != self.ignore_index
        return {
            **{f"iou_class_{index}": float(iou) for index, iou in enumerate(per_class)},
            "pixel_accuracy": float((predicted == targets)[valid].float().mean()),
            "agreement_with_full": float((predicted == full_logits.argmax(1)).float().mean()),
        }
