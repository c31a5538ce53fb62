"""Text-to-image: prompt adherence, judged by an independent classifier.

A generated image *adheres* when a classifier trained on real images (the *judge*, never on
generated ones) labels it as the class the prompt asked for; ``prompt_adherence`` is the share of
images that do. The judge is a module with ``features(images) -> (N, F)`` and
``head(features) -> (N, classes)`` taking images ``(N, 3, H, W)`` in [0, 1]. The scored tensor is
the judge's features, so ``extra`` can also give a Fréchet distance (torchmetrics' FID) in the
judge's feature space against real images of the same domain.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy
from torchmetrics.image.fid import FrechetInceptionDistance

from nnobfuscator.core.outputs import read_images
from nnobfuscator.tasks.base import Task, register_task


class _Features(nn.Module):
    """Hands features through to torchmetrics' FID, which then works in that feature space."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@register_task
class TextToImageTask(Task):
    """Prompt adherence; ``extra`` holds the judge-space FID and agreement with the full tier.

    Args:
        judge: the independent classifier (see the module docstring).
        reference: real images ``(N, 3, H, W)`` in [0, 1] for the FID; none: no FID.
    """

    name = "text-to-image"
    metric = "prompt_adherence"

    def __init__(self, judge: nn.Module | None = None, reference: torch.Tensor | None = None):
        if judge is None or not all(hasattr(judge, f) for f in ("features", "head")):
            raise ValueError(
                "text-to-image needs a judge: an independent classifier with features(images) "
                "and head(features); pass task=TextToImageTask(judge=...) to calibrate/evaluate"
            )
        self.judge = judge.eval()
        self._reference = reference
        self._reference_features: torch.Tensor | None = None

    @torch.inference_mode()
    def logits(self, output: Any) -> torch.Tensor:
        """The judge's features of the generated images (what is scored)."""
        images = read_images(output)
        device = next(self.judge.parameters()).device
        return self.judge.features(images.to(device)).float().cpu()

    @torch.inference_mode()
    def predictions(self, features: torch.Tensor) -> torch.Tensor:
        device = next(self.judge.parameters()).device
        return self.judge.head(features.to(device)).float().cpu()

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        scores = self.predictions(logits)
        return float(
            multiclass_accuracy(scores, targets, num_classes=scores.shape[1], average="micro")
        )

    def extra(
        self, logits: torch.Tensor, targets: torch.Tensor, full_logits: torch.Tensor
    ) -> dict[str, float]:
        agreement = self.predictions(logits).argmax(1) == self.predictions(full_logits).argmax(1)
        extra = {"agreement_with_full": float(agreement.float().mean())}
        if self._reference is not None:
            extra["fid_judge"] = self.fid(logits)
        return extra

    def fid(self, features: torch.Tensor) -> float:
        """Fréchet distance between generated and reference images in the judge's features."""
        if self._reference_features is None:
            assert self._reference is not None
            self._reference_features = self.logits(self._reference)
        metric = FrechetInceptionDistance(feature=_Features(features.shape[1]))
        metric.update(self._reference_features.double(), real=True)
        metric.update(features.double(), real=False)
        return float(metric.compute())
