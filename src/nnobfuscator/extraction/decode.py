"""The decoding attack: a user with a few labelled images learns to read a tier's answers back.

A tier that lowers accuracy by a deterministic, information-keeping change (mixed features, keyed
noise chosen by the predicted class) answers *consistently wrong*: the scores still tell the
classes apart, only under other names. A user who knows the true labels of ``q`` query images
(drawn from the train and calibration data, never the test split) fits

- ``decode-scores``: a multinomial logistic regression on the log of the answered scores (all of
  them, or those the tier's answer format shows), and
- ``decode-label``: the most frequent true class behind each answered label (labels only),

then reads the test split's answers through it. The reference, when the distillation attack ran,
is a fresh copy of the architecture trained on the same ``q`` true labels: decoding that beats it
means the tier's answers give away more than its accuracy says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from nnobfuscator.core.answers import AnswerFormat
from nnobfuscator.core.data import Split
from nnobfuscator.extraction.augment import AugmentConfig
from nnobfuscator.extraction.distill import MIN_QUERIES, draw_queries
from nnobfuscator.extraction.oracle import (
    AttackResult,
    TierBaseline,
    TierOracle,
    attack_result,
    lowest_tier,
    tier_baseline,
)
from nnobfuscator.tasks import Task, get_task

if TYPE_CHECKING:
    from nnobfuscator.tiered.model import TieredModel

_FLOOR = 1e-6  # log-scores of classes an answer leaves out (top-k) read log(_FLOOR)


def check_decodable(model: TieredModel, pool: Split | None, queries: Sequence[int]) -> None:
    """Raises ValueError when decoding cannot run."""
    if model.task != "classification":
        raise ValueError(
            f"the decoding attack covers classification only; this model's task is {model.task!r}"
        )
    if pool is None:
        raise ValueError(
            "decode needs a pool of labelled query images (train and calibration data)"
        )
    bad = [q for q in queries if not isinstance(q, int) or q < MIN_QUERIES]
    if bad or not queries:
        raise ValueError(
            f"query budgets must be integers of at least {MIN_QUERIES}, got {list(queries)}"
        )


class ScoreDecoder(torch.nn.Module):
    """A logistic regression on standardised log-scores: answered scores in, class logits out."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = torch.nn.Linear(len(mean), len(mean))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return self.linear((scores.clamp_min(_FLOOR).log() - self.mean) / self.std)


def fit_score_decoder(
    scores: torch.Tensor, labels: torch.Tensor, *, steps: int = 100, seed: int = 0
) -> ScoreDecoder:
    """Fit a :class:`ScoreDecoder` on answered scores ``(q, C)`` and their true labels (L-BFGS on
    the full batch, a little weight decay, seeded)."""
    features = scores.clamp_min(_FLOOR).log()
    torch.manual_seed(seed)
    decoder = ScoreDecoder(features.mean(0), features.std(0).clamp_min(1e-6))
    optimizer = torch.optim.LBFGS(
        decoder.parameters(), max_iter=steps, line_search_fn="strong_wolfe"
    )

    def loss() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        value = (
            F.cross_entropy(decoder(scores), labels) + 1e-4 * decoder.linear.weight.square().sum()
        )
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return decoder.eval()


def fit_label_decoder(answers: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """The most frequent true class behind each answered label (a label never answered, or a
    tie, keeps its own name); returns the map as a ``(C,)`` index tensor."""
    counts = torch.zeros(classes, classes)
    counts.index_put_((answers, labels), torch.ones(len(labels)), accumulate=True)
    return (counts + 1e-3 * torch.eye(classes)).argmax(dim=1)


def decode(
    model: TieredModel,
    pool: Split,
    test: Split,
    *,
    tier: str | None = None,
    queries: Sequence[int] = (300, 1000),
    answer_format: str | AnswerFormat | None = None,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    task: Task | None = None,
    baseline: TierBaseline | None = None,
    references: dict[int, float] | None = None,
    progress: bool = True,
) -> list[AttackResult]:
    """Fit both decoders on ``q`` labelled queries per budget and score the decoded test answers.

    Args:
        pool: labelled query images (train and calibration data; never the test split).
        answer_format: what the user sees (``None``: the tier's own format).
        references: distillation's true-label references by budget, when it ran.
        progress: unused (decoding takes seconds); accepted for a uniform call.

    Returns:
        ``decode-scores`` and ``decode-label`` per query budget.
    """
    check_decodable(model, pool, queries)
    tier = tier or lowest_tier(model)
    task = task or get_task(model.task)
    baseline = baseline or tier_baseline(model, test, tier, task)
    references = references or {}
    oracle = TierOracle(model, tier, task, answer_format=answer_format)
    answered = oracle(test.inputs)
    classes = answered.shape[1]
    results = []
    for count in queries:
        data = draw_queries(pool, count, augment=augment, seed=seed)
        scores = oracle(data.inputs)
        decoder = fit_score_decoder(scores, data.labels, seed=seed)
        with torch.inference_mode():
            decoded = decoder(answered)
        mapping = fit_label_decoder(scores.argmax(1), data.labels, classes)
        relabelled = F.one_hot(mapping[answered.argmax(1)], classes).float()
        for name, value in (
            ("decode-scores", task.score(decoded, test.labels)),
            ("decode-label", task.score(relabelled, test.labels)),
        ):
            results.append(
                attack_result(
                    name,
                    baseline,
                    count,
                    value,
                    reference=references.get(count),
                    details={"answer_format": answer_format},
                )
            )
    return results
