"""The knock-off attack: train a fresh copy of the architecture on a tier's answers.

A user of the tier sends ``q`` unlabelled images (drawn from the train and calibration data, never
the test split; lightly changed copies when ``q`` exceeds the pool), keeps the tier's argmax as
labels and trains an untrained copy of the same architecture on them. The reference is the same
copy, trained the same way on the same images with their true labels: a knock-off close to the
reference means the tier's answers are nearly as good a teacher as the truth.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from nnobfuscator.core.answers import AnswerFormat
from nnobfuscator.core.data import Split
from nnobfuscator.extraction.augment import AugmentConfig, random_perturbations
from nnobfuscator.extraction.oracle import (
    AttackResult,
    TierBaseline,
    TierOracle,
    attack_result,
    lowest_tier,
    tier_baseline,
)
from nnobfuscator.tasks import Task, get_task
from nnobfuscator.tasks.training import train_model

if TYPE_CHECKING:
    from nnobfuscator.tiered.model import TieredModel

MIN_QUERIES = 10


@dataclass(frozen=True)
class TrainRecipe:
    """How the copy trains (AdamW or SGD, one-cycle schedule, light random shifts).

    Args:
        steps: optimizer steps, whatever the query budget (epochs are rounded up to reach them).
    """

    lr: float = 2e-3
    optimizer: str = "adamw"
    batch_size: int = 64
    steps: int = 240

    def epochs(self, samples: int) -> int:
        return max(1, math.ceil(self.steps / math.ceil(samples / self.batch_size)))


def reinitialised_copy(model: nn.Module) -> nn.Module:
    """An untrained copy of ``model``: a deep copy whose modules all reset their parameters.

    Pass the plain model, not one wrapped by a TieredModel.
    """
    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh.train()


def check_distillable(
    model: TieredModel,
    pool: Split | None,
    build_copy: Callable[[], nn.Module] | None,
    queries: Sequence[int],
) -> None:
    """Raises ValueError when distillation cannot run."""
    if model.task != "classification":
        raise ValueError(
            f"the distillation attack covers classification only; this model's task is "
            f"{model.task!r} (run the repeat and augment attacks)"
        )
    if pool is None or build_copy is None:
        raise ValueError("distill needs a pool of query images and build_copy (an untrained copy)")
    if not isinstance(pool.inputs, torch.Tensor) or pool.inputs.dim() != 4:
        raise ValueError("distill needs image inputs (N, C, H, W) in its query pool")
    bad = [q for q in queries if not isinstance(q, int) or q < MIN_QUERIES]
    if bad or not queries:
        raise ValueError(
            f"query budgets must be integers of at least {MIN_QUERIES}, got {list(queries)}"
        )


def draw_queries(
    pool: Split, count: int, *, augment: AugmentConfig | None = None, seed: int = 0
) -> Split:
    """``count`` query images from ``pool`` (with their true labels, which only the reference
    uses): a seeded random subset, topped up with changed copies when ``count`` exceeds it."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pool), generator=generator)
    index = order[: min(count, len(pool))]
    images, labels = [pool.inputs[index]], [pool.labels[index]]
    missing, round_ = count - len(index), 1
    while missing > 0:
        extra = order[: min(missing, len(pool))]
        change = random_perturbations(
            2, tuple(pool.inputs.shape[-2:]), augment or AugmentConfig(), seed=seed + round_
        )[1]
        images.append(change.apply(pool.inputs[extra]))
        labels.append(pool.labels[extra])
        missing, round_ = missing - len(extra), round_ + 1
    return Split(f"queries-{count}", torch.cat(images), torch.cat(labels))


def train_copy(
    build_copy: Callable[[], nn.Module],
    data: Split,
    task: Task,
    recipe: TrainRecipe,
    *,
    seed: int,
    progress: bool,
    description: str,
) -> nn.Module:
    """A copy built by ``build_copy`` (seeded) and trained on ``data``."""
    torch.manual_seed(seed)
    student = build_copy()
    train_model(
        student,
        data,
        epochs=recipe.epochs(len(data)),
        lr=recipe.lr,
        optimizer=recipe.optimizer,
        batch_size=recipe.batch_size,
        read_logits=task.logits,
        progress=progress,
        description=description,
    )
    return student.eval()


@torch.inference_mode()
def score_model(model: nn.Module, split: Split, task: Task, batch_size: int = 256) -> float:
    """A plain model's task metric on ``split``."""
    model.eval()
    logits = [task.logits(model(b)).float() for b in torch.split(split.inputs, batch_size)]
    return task.score(torch.cat(logits), split.labels)


def distill(
    model: TieredModel,
    pool: Split,
    test: Split,
    *,
    build_copy: Callable[[], nn.Module],
    tier: str | None = None,
    queries: Sequence[int] = (300, 1000),
    answer_format: str | AnswerFormat | None = None,
    recipe: TrainRecipe | None = None,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    task: Task | None = None,
    baseline: TierBaseline | None = None,
    references: dict[int, float] | None = None,
    progress: bool = True,
) -> list[AttackResult]:
    """Train a knock-off on the tier's argmax answers for each query budget, and the same copy on
    true labels (the reference).

    Args:
        pool: unlabelled query images (train and calibration data; never the test split).
        build_copy: returns an untrained copy of the architecture (e.g. the zoo's
            ``build_model(name)``, or ``lambda: reinitialised_copy(plain_model)``).
        answer_format: what the user sees (``None``: the tier's own format; the argmax, all
            this attack uses, is the same in every format).
        references: reference scores by budget, filled and reused across tiers.

    Returns:
        One ``distill`` result per query budget.
    """
    check_distillable(model, pool, build_copy, queries)
    tier = tier or lowest_tier(model)
    task = task or get_task(model.task)
    recipe = recipe or TrainRecipe()
    baseline = baseline or tier_baseline(model, test, tier, task)
    references = {} if references is None else references
    oracle = TierOracle(model, tier, task, answer_format=answer_format)
    results = []
    for count in queries:
        data = draw_queries(pool, count, augment=augment, seed=seed)
        answers = Split(data.name, data.inputs, oracle(data.inputs).argmax(1))
        agreement = float((answers.labels == data.labels).float().mean())
        student = train_copy(
            build_copy,
            answers,
            task,
            recipe,
            seed=seed,
            progress=progress,
            description=f"knock-off of {tier} ({count} queries)",
        )
        if count not in references:
            reference = train_copy(
                build_copy,
                data,
                task,
                recipe,
                seed=seed,
                progress=progress,
                description=f"same copy on {count} true labels",
            )
            references[count] = score_model(reference, test, task)
        results.append(
            attack_result(
                "distill",
                baseline,
                count,
                score_model(student, test, task),
                reference=references[count],
                details={"answer_accuracy": agreement, "epochs": recipe.epochs(count)},
            )
        )
    return results
