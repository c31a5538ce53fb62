"""What a task adapter provides, and the task registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from nnobfuscator.core.outputs import read_output
from nnobfuscator.core.registry import Registry


class Task(ABC):
    """Reads a model's outputs and scores them.

    Subclasses set ``name`` (the report's ``task``) and ``metric`` (the report's ``metric``).
    """

    name: ClassVar[str]
    metric: ClassVar[str]

    def logits(self, output: Any) -> torch.Tensor:
        """The main tensor of a model output (see :func:`nnobfuscator.core.outputs.read_output`)."""
        return read_output(output)

    def read(self, output: Any, inputs: Any) -> torch.Tensor:
        """The tensor that is scored for a batch: :meth:`logits` of its output, unless the task
        also reads the batch's inputs (a language model's next tokens are its input ids)."""
        return self.logits(output)

    def sample_count(self, targets: torch.Tensor) -> int:
        """How many scored samples ``targets`` hold, for standard errors: one per row (an image)
        unless the task scores finer units."""
        return len(targets)

    def effective_count(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """How many independent samples the scores of ``logits`` against ``targets`` are worth,
        for standard errors: :meth:`sample_count` unless the task's samples come in correlated
        groups (tokens of one passage)."""
        return float(self.sample_count(targets))

    @abstractmethod
    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """The task metric, a fraction in [0, 1]."""

    @torch.inference_mode()
    def measure(
        self, model: Any, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 128
    ) -> float:
        """A plain model's metric on ``inputs`` (an image batch), in eval mode."""
        model.eval()
        logits = [self.read(model(batch), batch) for batch in torch.split(inputs, batch_size)]
        return self.score(torch.cat(logits), targets)

    def extra(
        self, logits: torch.Tensor, targets: torch.Tensor, full_logits: torch.Tensor
    ) -> dict[str, float]:
        """Secondary metrics for the report's ``extra`` field."""
        return {}


TASKS: Registry[type[Task]] = Registry("task")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding a task under ``cls.name`` (refuses duplicates)."""
    TASKS.register(cls.name, cls)
    return cls


def list_tasks() -> list[str]:
    return TASKS.names()


def get_task(name: str, **options: Any) -> Task:
    return TASKS.get(name)(**options)
