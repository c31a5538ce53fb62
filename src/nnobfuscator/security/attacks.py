"""Attacks by a user who sees only the answers of one tier, and what each of them recovers.

Every attack returns the utility it reached next to the tier's single-query utility, its target
and the full model's, so a tier's *gain* under attack reads directly:

- *repeat-and-vote* (``repeat``): the same input sent ``budget`` times; majority vote of the
  answers' argmax (``repeat-vote``) and the average of their scores (``repeat-mean``). Fresh noise
  per call (AIM) falls to it; keyed deterministic tiers answer the same every time: gain 0.
- *augment-and-vote* (``augment``): ``budget`` slightly changed copies (the first the original):
  shifts, small rotations and scalings, noise, flips where the task allows; voted and averaged the
  same way. Segmentation copies only shift and flip (plus noise), and their per-pixel scores are
  mapped back before voting. ``jitter`` does the same with faint noise alone.
- *distillation* (``distill``, :mod:`nnobfuscator.extraction.distill`): a fresh copy of the
  architecture trained on the tier's answers for a budget of unlabelled queries, against the same
  copy trained on as many true labels.
- *decoding* (``decode``, :mod:`nnobfuscator.extraction.decode`): a user with a few labelled
  images learns to map the tier's answers back to the true class.
- *extractable utility* (``extract``, :mod:`nnobfuscator.extraction.extract`): the best of the face
  value, decoding and a knock-off trained on the pool's answers plus a few true labels, beside
  what those labels give alone.

Scores are what a served tier can answer: softmax probabilities (per pixel for segmentation), all
of them or only what the tier's answer format shows (the server gives no more).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from nnobfuscator.core.answers import AnswerFormat
from nnobfuscator.core.data import Split
from nnobfuscator.extraction.augment import (
    JITTER,
    AugmentConfig,
    Perturbation,
    random_perturbations,
)
from nnobfuscator.extraction.oracle import (
    AttackResult,
    TierBaseline,
    TierOracle,
    attack_result,
    check_attackable,
    check_budget,
    lowest_tier,
    tier_baseline,
)
from nnobfuscator.tasks import Task, get_task

if TYPE_CHECKING:
    from nnobfuscator.extraction.distill import TrainRecipe
    from nnobfuscator.extraction.extract import CopyRecipe
    from nnobfuscator.tiered.model import TieredModel

_TIE_BREAK = 1e-3


def repeat_and_vote(
    model: TieredModel,
    split: Split,
    *,
    tier: str | None = None,
    budget: int = 21,
    answer_format: str | AnswerFormat | None = None,
    task: Task | None = None,
    baseline: TierBaseline | None = None,
    progress: bool = True,
) -> list[AttackResult]:
    """Send every input ``budget`` times to ``tier`` and vote (``repeat-vote``) or average the
    scores (``repeat-mean``).

    Args:
        answer_format: what the user sees (``None``: the tier's own format).

    Returns:
        Two results: ``repeat-vote`` and ``repeat-mean``.
    """
    check_attackable(model)
    check_budget(budget)
    tier = tier or lowest_tier(model)
    task = task or get_task(model.task)
    baseline = baseline or tier_baseline(model, split, tier, task)
    oracle = TierOracle(model, tier, task, answer_format=answer_format)
    tally = _Tally()
    for _ in tqdm(range(budget), desc=f"repeat x{budget} at {tier}", disable=not progress):
        tally.add(oracle(split.inputs))
    return tally.results("repeat", split, task, baseline, budget)


def augment_and_vote(
    model: TieredModel,
    split: Split,
    *,
    tier: str | None = None,
    budget: int = 21,
    augment: AugmentConfig | None = None,
    name: str = "augment",
    seed: int = 0,
    answer_format: str | AnswerFormat | None = None,
    task: Task | None = None,
    baseline: TierBaseline | None = None,
    progress: bool = True,
) -> list[AttackResult]:
    """Send ``budget`` slightly changed copies of every input (the first unchanged) to ``tier``
    and vote (``augment-vote``) or average the scores (``augment-mean``).

    Segmentation copies only shift by whole pixels and flip (plus noise); each copy's per-pixel
    scores are mapped back to the original pixels, and a pixel gets votes from the copies that
    still show it.

    Args:
        augment: how far copies stray (default :class:`AugmentConfig`: flips allowed; pass
            ``AugmentConfig(flips=False)`` for digits and other data that flips change;
            :data:`~nnobfuscator.extraction.augment.JITTER` for faint noise alone).
        name: the results' prefix (``augment``, ``jitter``).
        seed: fixes every random change.
        answer_format: what the user sees (``None``: the tier's own format).

    Returns:
        Two results: ``{name}-vote`` and ``{name}-mean``.
    """
    check_attackable(model)
    check_budget(budget)
    if not isinstance(split.inputs, torch.Tensor) or split.inputs.dim() != 4:
        raise ValueError(f"{name}-and-vote needs image inputs (N, C, H, W)")
    tier = tier or lowest_tier(model)
    task = task or get_task(model.task)
    baseline = baseline or tier_baseline(model, split, tier, task)
    dense = model.task == "segmentation"
    changes = random_perturbations(
        budget,
        tuple(split.inputs.shape[-2:]),
        augment or AugmentConfig(),
        invertible=dense,
        seed=seed,
    )
    oracle = TierOracle(model, tier, task, answer_format=answer_format)
    tally = _Tally()
    for change in tqdm(changes, desc=f"{name} x{budget} at {tier}", disable=not progress):
        scores = oracle(change.apply(split.inputs))
        tally.add(*_mapped_back(scores, change) if dense else (scores,))
    return tally.results(name, split, task, baseline, budget)


def _mapped_back(scores: torch.Tensor, change: Perturbation) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel scores on the original grid, and which pixels the copy saw ``(1, 1, H, W)``."""
    valid = change.valid(*scores.shape[-2:])
    return change.invert(scores), valid[None, None]


class _Tally:
    """Running vote counts and score sums over answers (per pixel for dense answers)."""

    def __init__(self) -> None:
        self.votes: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    def add(self, scores: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        mask = torch.ones(1) if valid is None else valid.float()
        votes = torch.zeros_like(scores).scatter_(1, scores.argmax(1, keepdim=True), 1.0) * mask
        if self.votes is None:
            self.votes, self.sums, self.seen = votes, scores * mask, mask.clone()
        else:
            self.votes += votes
            self.sums += scores * mask
            self.seen = self.seen + mask

    def results(
        self, attack: str, split: Split, task: Task, baseline: TierBaseline, budget: int
    ) -> list[AttackResult]:
        assert self.votes is not None and self.sums is not None and self.seen is not None
        mean = self.sums / self.seen.clamp_min(1.0)
        voted = self.votes + _TIE_BREAK * mean
        return [
            attack_result(f"{attack}-vote", baseline, budget, task.score(voted, split.labels)),
            attack_result(f"{attack}-mean", baseline, budget, task.score(mean, split.labels)),
        ]


#: attack names, cheapest first
ATTACKS = ("repeat", "jitter", "augment", "decode", "distill", "extract")
#: the attacks that need labelled or unlabelled query images and cover classification only
CLASSIFICATION_ONLY = ("decode", "distill", "extract")


def default_attacks(task: str) -> list[str]:
    """Every attack that covers ``task``."""
    return [a for a in ATTACKS if task == "classification" or a not in CLASSIFICATION_ONLY]


def run_attacks(
    model: TieredModel,
    test: Split,
    *,
    attacks: Sequence[str] | None = None,
    tiers: Sequence[str] | None = None,
    budget: int = 21,
    queries: Sequence[int] = (300, 1000),
    pool: Split | None = None,
    build_copy: Callable[[], torch.nn.Module] | None = None,
    recipe: TrainRecipe | None = None,
    copy_recipe: CopyRecipe | None = None,
    augment: AugmentConfig | None = None,
    answer_format: str | AnswerFormat | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[AttackResult]:
    """Run the named attacks against each tier in ``tiers`` (default: the lowest).

    Random draws of the attacks (and of tiers that draw fresh noise on every call) are seeded
    with ``seed``; the global random state is restored afterwards.

    Args:
        test: where utility is measured (never a source of queries for distill and decode).
        attacks: names from :data:`ATTACKS`; default: every attack that covers the task.
        pool: query images for ``distill`` and ``decode`` (train and calibration data).
        build_copy: an untrained copy of the architecture, for ``distill``.
        recipe: how the copy trains (:class:`~nnobfuscator.extraction.distill.TrainRecipe`).
        copy_recipe: how ``extract``'s knock-offs and from-scratch copies train (the owner's
            recipe: :class:`~nnobfuscator.extraction.extract.CopyRecipe`).
        augment: the ``augment`` attack's changes (``jitter`` always uses faint noise alone).
        answer_format: what the user sees (``None``: the tier's own format).

    Raises:
        ValueError: an unknown attack or tier, a bad budget, an uncovered task, or ``distill``
            without ``pool`` and ``build_copy``.
    """
    check_attackable(model)
    check_budget(budget)
    attacks = list(attacks) if attacks is not None else default_attacks(model.task)
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown or not attacks:
        raise ValueError(
            f"unknown attacks {unknown or '(none given)'}; choose from {', '.join(ATTACKS)}"
        )
    tiers = list(tiers or [lowest_tier(model)])
    for tier in tiers:
        model.get_tier(tier)
    task = get_task(model.task)
    from nnobfuscator.extraction import decode, distill, extract

    if "decode" in attacks or "extract" in attacks:
        decode.check_decodable(model, pool, queries)
    if "distill" in attacks:
        distill.check_distillable(model, pool, build_copy, queries)
    options = {"budget": budget, "task": task, "progress": progress, "answer_format": answer_format}
    results: list[AttackResult] = []
    references: dict[int, float] = {}
    labels_alone: dict[int, dict[str, float]] | None = None
    with torch.random.fork_rng(devices=[]):
        for tier in tiers:
            torch.manual_seed(seed)
            baseline = tier_baseline(model, test, tier, task)
            common = {"tier": tier, "baseline": baseline, **options}
            if "repeat" in attacks:
                results += repeat_and_vote(model, test, **common)
            for name, config in (("jitter", JITTER), ("augment", augment)):
                if name in attacks:
                    results += augment_and_vote(
                        model, test, augment=config, name=name, seed=seed, **common
                    )
            common.pop("budget")
            if "distill" in attacks:
                assert pool is not None and build_copy is not None
                results += distill.distill(
                    model,
                    pool,
                    test,
                    queries=queries,
                    build_copy=build_copy,
                    recipe=recipe,
                    augment=augment,
                    seed=seed,
                    references=references,
                    **common,
                )
            if "decode" in attacks:
                assert pool is not None
                results += decode.decode(
                    model,
                    pool,
                    test,
                    queries=queries,
                    augment=augment,
                    seed=seed,
                    references=references,
                    **common,
                )
            if "extract" in attacks:
                assert pool is not None
                copy_recipe = copy_recipe or extract.CopyRecipe()
                if labels_alone is None:
                    labels_alone = extract.labels_only(
                        pool,
                        test,
                        queries,
                        build_copy=build_copy,
                        recipe=copy_recipe,
                        seed=seed,
                        progress=progress,
                    )
                found = extract.extract(
                    model,
                    tier,
                    pool,
                    test,
                    queries=queries,
                    answer_format=answer_format,
                    build_copy=build_copy,
                    recipe=copy_recipe,
                    baseline=labels_alone,
                    seed=seed,
                    progress=progress,
                )
                results += [
                    attack_result(
                        "extract",
                        baseline,
                        e.queries,
                        e.value,
                        reference=e.labels_only,
                        details={
                            "answer_format": e.answer_format,
                            "face": e.face,
                            "decode": e.decode,
                            "knockoff": e.knockoff,
                        },
                    )
                    for e in found
                ]
    return results
