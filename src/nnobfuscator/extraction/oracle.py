"""What every attack on a served tier shares: the tier as an oracle, its baseline, the result row.

``attacks``, ``decode`` and ``distill`` build on this module, never on each other's internals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from nnobfuscator.core.answers import AnswerFormat
from nnobfuscator.core.data import Split
from nnobfuscator.tasks import Task, get_task

if TYPE_CHECKING:
    from nnobfuscator.tiered.model import TieredModel

ATTACKED_TASKS = ("classification", "segmentation")
#: vote ties go to the class with the higher average score (a vote is worth more than any score)


@dataclass
class AttackResult:
    """What one attack reached on one tier (metric values are fractions in [0, 1]).

    Args:
        attack: ``repeat-vote``, ``repeat-mean``, ``jitter-vote``, ``jitter-mean``,
            ``augment-vote``, ``augment-mean``, ``distill``, ``decode-scores``, ``decode-label``.
        tier: the attacked tier.
        budget: queries per input (repeat, jitter, augment), or query images in all (distill:
            unlabelled; decode: labelled).
        target: the tier's calibrated target (``None`` for a full tier).
        single: the tier's utility with one query per input.
        attacked: the utility the attack reached.
        full: the full model's utility.
        reference: distill and decode: the same copy trained on ``budget`` true labels.
        details: facts an attack adds (e.g. how often the tier's answers were right).
    """

    attack: str
    tier: str
    budget: int
    target: float | None
    single: float
    attacked: float
    full: float
    reference: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def gain(self) -> float:
        """Utility the attack added over a single query."""
        return self.attacked - self.single

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gain": self.gain}


class TierOracle:
    """What a user of one tier sees: the tier's scores for the inputs they send.

    Args:
        model: the tiered model.
        tier: the tier whose answers the user gets.
        task: reads and scores outputs (default: the model's task).
        answer_format: what the user sees (:class:`~nnobfuscator.core.answers.AnswerFormat`; withheld
            scores read 0); ``None``: the tier's own format (a classifier), every score (dense
            tasks, whose answer is a mask).
        batch_size: inputs per forward pass.
    """

    def __init__(
        self,
        model: TieredModel,
        tier: str,
        task: Task | None = None,
        *,
        answer_format: str | AnswerFormat | None = None,
        batch_size: int = 256,
    ) -> None:
        info = model.get_tier(tier)
        self.model, self.tier, self.batch_size = model, tier, batch_size
        self.task = task or get_task(model.task)
        if answer_format is None and model.task == "classification":
            answer_format = info.format
        self.answer_format = AnswerFormat.parse(answer_format or "scores")
        self.queries = 0

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """Softmax scores ``(N, C)`` or ``(N, C, H, W)`` of the tier for ``inputs``."""
        self.model.eval()
        scores = torch.cat(
            [
                self.task.logits(self.model(batch, tier=self.tier)).float().softmax(dim=1)
                for batch in torch.split(inputs, self.batch_size)
            ]
        )
        self.queries += len(inputs)
        return self.answer_format.view(scores)


@dataclass
class TierBaseline:
    """A tier's utility from single queries, its target and the full model's utility."""

    tier: str
    target: float | None
    single: float
    full: float


@torch.inference_mode()
def tier_baseline(
    model: TieredModel, split: Split, tier: str, task: Task | None = None
) -> TierBaseline:
    """Score one query per input at ``tier`` and at the full model."""
    task = task or get_task(model.task)
    info = model.get_tier(tier)
    oracle = TierOracle(model, tier, task)
    full = torch.cat(
        [task.logits(model.forward_tier(b, None)).float() for b in torch.split(split.inputs, 256)]
    )
    return TierBaseline(
        tier,
        info.target_value,
        task.score(oracle(split.inputs), split.labels),
        task.score(full, split.labels),
    )


def lowest_tier(model: TieredModel) -> str:
    """The attacked tier by default: the lowest one."""
    return model.tier_names[0]


def check_attackable(model: TieredModel) -> None:
    """Raises ValueError for tasks the attacks do not cover (text-to-image)."""
    if model.task not in ATTACKED_TASKS:
        raise ValueError(
            f"attacks cover classification and segmentation; this model's task is {model.task!r}"
        )


def check_budget(budget: int) -> None:
    if not isinstance(budget, int) or not 2 <= budget <= 1000:
        raise ValueError(f"the attack budget (queries per input) must be 2..1000, got {budget!r}")


def attack_result(
    attack: str, baseline: TierBaseline, budget: int, attacked: float, **extra: Any
) -> AttackResult:
    return AttackResult(
        attack,
        baseline.tier,
        budget,
        baseline.target,
        baseline.single,
        attacked,
        baseline.full,
        **extra,
    )
