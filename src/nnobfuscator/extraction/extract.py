"""Extractable utility: what a user of a tier gets out of it when they also hold some labels.

The *face value* of a tier is its metric on its answers as given. Its user, though, holds a pool
of unlabelled images (never the test split) with ``N`` true labels among them, queries the tier
on the whole pool and sees each answer in the tier's format (:class:`~nnobfuscator.core.answers.
AnswerFormat`). The **extractable utility@N** is the best, on the test split, of

- the face value;
- ``decode``: a logistic regression from answers to labels, fitted on the ``N`` labelled
  answers (:func:`~nnobfuscator.extraction.decode.fit_score_decoder`);
- ``knockoff``: the model's architecture, trained from scratch with the owner's recipe on the
  pool's answers (soft targets: the scores shown, the rest of the mass spread over the classes
  not shown) plus the ``N`` true labels.

**labels-only@N** is what the same ``N`` labels give without the tier: the best of a logistic
regression on the pixels and the same architecture trained from scratch on the ``N`` labelled
images alone (as many optimizer steps as a knock-off). A tier withholds utility when its
extractable utility stays near ``max(target, labels-only)``; a tier that only renames what its
answers carry decodes back to near the full model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from nnobfuscator.core.answers import AnswerFormat
from nnobfuscator.core.data import Split
from nnobfuscator.extraction.decode import fit_score_decoder
from nnobfuscator.extraction.distill import score_model
from nnobfuscator.tasks import get_task
from nnobfuscator.tasks.training import train_model

if TYPE_CHECKING:
    from nnobfuscator.tiered.model import TieredModel

#: the query budgets of the issue: a few hundred and a thousand labels
DEFAULT_QUERIES = (300, 1000)
_PIXEL_C = (0.01, 0.05, 0.2)  # inverse regularisation strengths the pixel regression tries


@dataclass(frozen=True)
class CopyRecipe:
    """How the attacker trains a copy of the architecture (knock-off and labels-only).

    The owner's own recipe by default (optimizer, learning rate, batch size, mirror flips), run
    for ``epochs`` over the pool: knock-offs and from-scratch copies get the same steps.
    """

    epochs: int = 3
    lr: float = 2e-3
    optimizer: str = "adamw"
    batch_size: int = 128
    flips: bool = False

    def steps(self, pool_size: int) -> int:
        return self.epochs * math.ceil(pool_size / self.batch_size)

    @classmethod
    def from_training(cls, recipe: dict[str, Any] | None) -> CopyRecipe:
        """The recipe a model was trained with (as stored with zoo models), else the default."""
        if not recipe:
            return cls()
        return cls(
            epochs=int(recipe.get("epochs", cls.epochs)),
            lr=float(recipe.get("lr", cls.lr)),
            optimizer=str(recipe.get("optimizer", cls.optimizer)),
            batch_size=int(recipe.get("batch_size", cls.batch_size)),
            flips=bool(recipe.get("flips", False)),
        )


@dataclass
class Extracted:
    """What a tier's user reaches with ``queries`` labels (fractions in [0, 1])."""

    queries: int
    answer_format: str
    face: float
    decode: float
    knockoff: float | None
    labels_only: float

    @property
    def value(self) -> float:
        """The extractable utility: the best of face value, decoding and the knock-off."""
        return max(self.face, self.decode, self.knockoff or 0.0)

    def to_dict(self) -> dict[str, Any]:
        row = {
            "value": self.value,
            "labels_only": self.labels_only,
            "decode": self.decode,
            "answer_format": self.answer_format,
        }
        if self.knockoff is not None:
            row["knockoff"] = self.knockoff
        return row


def labelled_subset(pool: Split, count: int, seed: int = 0) -> torch.Tensor:
    """Indices of the ``count`` pool images whose labels the attacker holds (seeded, and the
    same draw for every tier, so tiers are compared on the same labels)."""
    if count > len(pool):
        raise ValueError(f"{count} labelled queries asked, but the pool holds {len(pool)} images")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(len(pool), generator=generator)[:count]


def pixel_regression(train: Split, test: Split) -> float:
    """Accuracy of a logistic regression on the pixels (best of a few regularisations, chosen
    by 3-fold cross-validation on ``train``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    features = train.inputs.flatten(1).numpy()
    labels = train.labels.numpy()
    folds = int(min(3, np.bincount(labels).min()))
    model = LogisticRegression(max_iter=1000)
    if folds >= 2:
        model = GridSearchCV(model, {"C": list(_PIXEL_C)}, cv=folds).fit(features, labels)
    else:
        model.set_params(C=_PIXEL_C[1]).fit(features, labels)
    predicted = model.predict(test.inputs.flatten(1).numpy())
    return float((predicted == test.labels.numpy()).mean())


def train_copy(
    build_copy: Callable[[], nn.Module],
    data: Split,
    recipe: CopyRecipe,
    steps: int,
    *,
    seed: int,
    progress: bool,
    description: str,
) -> nn.Module:
    """A fresh copy (seeded) trained for about ``steps`` optimizer steps on ``data`` (labels or
    soft targets)."""
    torch.manual_seed(seed)
    copy = build_copy()
    batches = math.ceil(len(data) / recipe.batch_size)
    train_model(
        copy,
        data,
        epochs=max(1, round(steps / batches)),
        lr=recipe.lr,
        optimizer=recipe.optimizer,
        batch_size=recipe.batch_size,
        progress=progress,
        description=description,
        flips=recipe.flips,
    )
    return copy.eval()


def labels_only(
    pool: Split,
    test: Split,
    queries: Sequence[int],
    *,
    build_copy: Callable[[], nn.Module] | None,
    recipe: CopyRecipe,
    seed: int = 0,
    progress: bool = True,
) -> dict[int, dict[str, float]]:
    """Per budget, what the labelled images alone give: ``pixels`` (logistic regression),
    ``scratch`` (the architecture from scratch, when ``build_copy`` is given) and ``value``."""
    task = get_task("classification")
    found = {}
    for count in queries:
        index = labelled_subset(pool, count, seed)
        labelled = Split(f"labelled-{count}", pool.inputs[index], pool.labels[index])
        row = {"pixels": pixel_regression(labelled, test)}
        if build_copy is not None:
            copy = train_copy(
                build_copy,
                labelled,
                recipe,
                recipe.steps(len(pool)),
                seed=seed,
                progress=progress,
                description=f"from scratch on {count} labels",
            )
            row["scratch"] = score_model(copy, test, task)
        row["value"] = max(row.values())
        found[count] = row
    return found


@torch.inference_mode()
def tier_probabilities(model: TieredModel, tier: str, inputs: torch.Tensor) -> torch.Tensor:
    """Softmax scores ``(N, C)`` of ``tier`` for ``inputs`` (what the format then cuts)."""
    task = get_task(model.task)
    model.eval()
    return torch.cat(
        [
            task.logits(model(batch, tier=tier)).float().softmax(dim=1)
            for batch in torch.split(inputs, 256)
        ]
    )


def extract(
    model: TieredModel,
    tier: str,
    pool: Split,
    test: Split,
    *,
    queries: Sequence[int] = DEFAULT_QUERIES,
    answer_format: str | AnswerFormat | None = None,
    build_copy: Callable[[], nn.Module] | None = None,
    recipe: CopyRecipe | None = None,
    baseline: dict[int, dict[str, float]] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[Extracted]:
    """The extractable utility of ``tier`` per query budget (see the module docstring).

    Args:
        pool: the attacker's images (labels are read only for the ``N`` drawn per budget).
        answer_format: what the user sees (default: the tier's own format).
        build_copy: an untrained copy of the architecture; without it, no knock-off is trained
            (decoding and the face value only: seconds instead of minutes).
        baseline: :func:`labels_only` per budget, when already measured (shared by tiers).

    Raises:
        ValueError: a task other than classification, or a budget larger than the pool.
    """
    if model.task != "classification":
        raise ValueError(f"extractable utility covers classification; this is {model.task!r}")
    fmt = AnswerFormat.parse(answer_format or model.get_tier(tier).format)
    recipe = recipe or CopyRecipe()
    task = get_task(model.task)
    shown_test = fmt.view(tier_probabilities(model, tier, test.inputs))
    face = task.score(shown_test, test.labels)
    pool_probabilities = tier_probabilities(model, tier, pool.inputs)
    shown_pool = fmt.view(pool_probabilities)
    baseline = baseline or labels_only(
        pool, test, queries, build_copy=None, recipe=recipe, seed=seed, progress=progress
    )
    results = []
    for count in queries:
        index = labelled_subset(pool, count, seed)
        decoder = fit_score_decoder(shown_pool[index], pool.labels[index], seed=seed)
        with torch.inference_mode():
            decoded = task.score(decoder(shown_test), test.labels)
        knockoff = None
        if build_copy is not None:
            targets = fmt.targets(pool_probabilities)
            targets[index] = nn.functional.one_hot(pool.labels[index], targets.shape[1]).float()
            copy = train_copy(
                build_copy,
                Split(f"answers-{count}", pool.inputs, targets),
                recipe,
                recipe.steps(len(pool)),
                seed=seed,
                progress=progress,
                description=f"knock-off of {tier} ({fmt.spec}, {count} labels)",
            )
            knockoff = score_model(copy, test, task)
        results.append(
            Extracted(count, fmt.spec, face, decoded, knockoff, baseline[count]["value"])
        )
    return results


@dataclass(frozen=True)
class Overrun:
    """A tier whose user extracts more than ``max(target, labels-only) + margin``."""

    tier: str
    found: Extracted
    target: float
    margin: float

    @property
    def bound(self) -> float:
        return max(self.target, self.found.labels_only) + self.margin

    @property
    def excess(self) -> float:
        """How far the extractable utility is over the bound (a fraction)."""
        return self.found.value - self.bound

    def __str__(self) -> str:
        return (
            f"tier {self.tier!r} ({self.found.answer_format}) gives {100 * self.found.value:.1f}% "
            f"with {self.found.queries} labels, {100 * self.excess:.1f} points over its bound "
            f"{100 * self.bound:.1f}% = max(target {100 * self.target:.1f}%, labels alone "
            f"{100 * self.found.labels_only:.1f}%) + {100 * self.margin:.0f}"
        )


def add_extractable(
    model: TieredModel,
    report: dict[str, Any],
    pool: Split,
    test: Split,
    *,
    queries: Sequence[int] = DEFAULT_QUERIES,
    build_copy: Callable[[], nn.Module] | None = None,
    recipe: CopyRecipe | None = None,
    margin: float = 0.03,
    seed: int = 0,
    progress: bool = True,
    baseline: dict[int, dict[str, float]] | None = None,
    tiers: Sequence[str] | None = None,
) -> list[Overrun]:
    """Measure ``tiers`` (default: every tier below full) under their own answer formats, write
    ``extractable`` into their report rows, and return what breaks
    ``extractable <= max(target, labels-only) + margin`` (empty when every tier holds).

    ``baseline`` is :func:`labels_only` per budget when already measured (it is measured here
    otherwise).
    """
    recipe = recipe or CopyRecipe()
    baseline = baseline or labels_only(
        pool, test, queries, build_copy=build_copy, recipe=recipe, seed=seed, progress=progress
    )
    rows = {row["name"]: row for row in report["tiers"]}
    names = tiers if tiers is not None else [n for n, t in model.tiers.items() if not t.is_full]
    overruns = []
    for name in names:
        found = extract(
            model,
            name,
            pool,
            test,
            queries=queries,
            build_copy=build_copy,
            recipe=recipe,
            baseline=baseline,
            seed=seed,
            progress=progress,
        )
        rows[name]["extractable"] = {str(e.queries): e.to_dict() for e in found}
        target = model.tiers[name].target_value or 0.0
        overruns += [
            over
            for over in (Overrun(name, e, target, margin) for e in found)
            if over.excess > 1e-12
        ]
    report.setdefault("settings", {})["extractable"] = {
        "queries": list(queries),
        "pool": len(pool),
        "margin": margin,
        "knockoff": build_copy is not None,
        "recipe": asdict(recipe),
    }
    return overruns
