"""What a user of a tier receives: the answer format, part of the tier.

A classifier's answer can carry every class's score (``scores``), the ``top_k:N`` best scores,
the best label with its score (``top1``) or the label alone (``label``). The less an answer
carries, the less a user holding some labelled data can decode from it; calibration and the
attacks measure each tier under its own format, and the server never gives a key more than its
tier's format allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

FormatKind = Literal["scores", "top_k", "top1", "label"]
#: default format of a tier that is not the full model: the five best scores
DEFAULT_LOWER_FORMAT = "top_k:5"
#: default format of the full tier: every score
DEFAULT_FULL_FORMAT = "scores"


@dataclass(frozen=True)
class AnswerFormat:
    """How much of a classifier's answer a tier's user sees.

    Args:
        kind: ``scores``, ``top_k``, ``top1`` or ``label``.
        k: the number of scores for ``top_k``.
    """

    kind: FormatKind
    k: int | None = None

    @classmethod
    def parse(cls, spec: str | AnswerFormat) -> AnswerFormat:
        """Parse ``scores``, ``top_k:5`` (or ``top5``), ``top1`` or ``label``.

        Raises:
            ValueError: anything else (the message lists the forms).
        """
        if isinstance(spec, AnswerFormat):
            return spec
        text = str(spec).strip().lower().replace("-", "_")
        if text in ("scores", "top1", "label"):
            return cls(text)  # type: ignore[arg-type]
        number = text.removeprefix("top_k:") if text.startswith("top_k:") else None
        if number is None and text.startswith("top") and text[3:].isdigit():
            number = text[3:]
        if number is not None and number.isdigit() and int(number) >= 1:
            return cls("top1") if int(number) == 1 else cls("top_k", int(number))
        raise ValueError(
            f"bad answer format {spec!r}: use 'scores' (every class), 'top_k:N' (the N best "
            "scores), 'top1' (the label and its score) or 'label' (the label alone)"
        )

    @property
    def spec(self) -> str:
        return f"top_k:{self.k}" if self.kind == "top_k" else self.kind

    def __str__(self) -> str:
        return self.spec

    @property
    def has_scores(self) -> bool:
        """Whether answers carry scores (``label`` carries none)."""
        return self.kind != "label"

    def max_classes(self, num_classes: int) -> int:
        """How many ranked classes an answer may list."""
        if self.kind == "scores":
            return num_classes
        if self.kind == "top_k":
            return min(int(self.k or 1), num_classes)
        return 1

    def view(self, probabilities: torch.Tensor) -> torch.Tensor:
        """What the user sees of softmax ``probabilities`` ``(N, C, ...)``, as ``(N, C, ...)``.

        Withheld scores read 0; a ``label`` answer reads 1 at its class (it carries no score).
        """
        classes = probabilities.shape[1]
        if self.kind == "scores":
            return probabilities
        keep = self.max_classes(classes)
        best = probabilities.topk(keep, dim=1)
        values = torch.ones_like(best.values) if self.kind == "label" else best.values
        return torch.zeros_like(probabilities).scatter_(1, best.indices, values)

    def targets(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Soft training targets a user would build from the answers: the scores shown, the
        rest of the probability mass spread evenly over the classes not shown."""
        shown = self.view(probabilities)
        classes = shown.shape[1]
        missing = (1.0 - shown.sum(dim=1, keepdim=True)).clamp_min(0.0)
        hidden = (shown == 0).float()
        spread = missing / hidden.sum(dim=1, keepdim=True).clamp_min(1.0)
        return shown + hidden * spread if classes > 1 else shown


def default_format(is_full: bool) -> str:
    """The answer format of a tier that names none."""
    return DEFAULT_FULL_FORMAT if is_full else DEFAULT_LOWER_FORMAT
