"""What a task adapter provides, and the task registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch


class Task(ABC):
    """Reads a model's outputs and scores them.

    Subclasses set ``name`` (the report's ``task``) and ``metric`` (the report's ``metric``).
    """

    name: ClassVar[str]
    metric: ClassVar[str]

    def logits(self, output: Any) -> torch.Tensor:
        """The main logits tensor of a model output (tensor or torchvision ``{"out": ...}`` dict)."""
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, dict) and "out" in output:
            return output["out"]
        raise TypeError(
            f"cannot read logits from a model output of type {type(output).__name__}; "
            "return a tensor or a dict with an 'out' tensor"
        )

    @abstractmethod
    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """The task metric, a fraction in [0, 1]."""

    def extra(
        self, logits: torch.Tensor, targets: torch.Tensor, full_logits: torch.Tensor
    ) -> dict[str, float]:
        """Secondary metrics for the report's ``extra`` field."""
        return {}


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    _TASKS[cls.name] = cls
    return cls


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, **options: Any) -> Task:
    try:
        return _TASKS[name](**options)
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {list_tasks()}") from None
