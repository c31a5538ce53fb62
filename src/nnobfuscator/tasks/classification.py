"""Image classification: accuracy (top-1, micro-averaged) via torchmetrics."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy

from nnobfuscator.tasks.base import Task, register_task


@register_task
class ClassificationTask(Task):
    """Top-1 accuracy; ``extra`` holds top-5 accuracy and agreement with the full model."""

    name = "classification"
    metric = "accuracy"

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        return float(
            multiclass_accuracy(logits, targets, num_classes=logits.shape[1], average="micro")
        )

    def extra(
        self, logits: torch.Tensor, targets: torch.Tensor, full_logits: torch.Tensor
    ) -> dict[str, float]:
        classes = logits.shape[1]
        top5 = multiclass_accuracy(
            logits, targets, num_classes=classes, average="micro", top_k=min(5, classes)
        )
        agreement = (logits.argmax(1) == full_logits.argmax(1)).float().mean()
        return {"top5": float(top5), "agreement_with_full": float(agreement)}
