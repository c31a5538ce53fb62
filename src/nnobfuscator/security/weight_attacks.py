"""Attacks on sealed weights: what a device holder recovers from the shipped (lowest-tier) weights.

The attacker has the bundle's plain weights and a share of the labelled training data, and tries:

- *fine-tuning* the shipped weights on that share (1%, 5%, 10% by default): the attacker builds
  the architecture, loads what the plain file holds and initialises what it withholds (the blocks
  the lowest tier skips) at random; and the same with the head initialised at random too (a
  class-merge head answers only the lowest tier's classes);
- *norm clipping*: each weight tensor clipped to ``mean ± t·std`` (t = 2, 3, 4), no training;
- *outlier replacement then fine-tuning* (the attack that broke NNSplitter, whose locked weights
  sat at clamp bounds): weights beyond ``mean ± t·std`` set to the tensor's mean, then fine-tuned
  on the largest share.

The honest baseline for each share is training the same architecture from scratch on the same
data with the same recipe: the sealed weights are worth something only while the attacker gains
less from them than from scratch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from nnobfuscator.core.data import Split
from nnobfuscator.tasks import Task
from nnobfuscator.tasks.training import train_model

SHARES = (0.01, 0.05, 0.1)
CLIP_SIGMAS = (2.0, 3.0, 4.0)
REPLACE_SIGMA = 3.0


@dataclass(frozen=True)
class WeightAttackRecipe:
    """How the attacker trains: a fixed number of AdamW steps with a one-cycle schedule, the
    same for fine-tuning and for training from scratch.

    Args:
        steps: optimizer steps whatever the data size (small shares repeat their data).
        finetune_lr: peak learning rate when starting from the shipped weights.
        scratch_lr: peak learning rate from random initial weights (the demo's recipe).
        flips, label_smoothing: as the owner trained (mirror flips only for data they keep).
    """

    steps: int = 200
    batch_size: int = 64
    finetune_lr: float = 1e-3
    scratch_lr: float = 2e-3
    seed: int = 0
    flips: bool = False
    label_smoothing: float = 0.0

    @classmethod
    def from_training(cls, recipe: dict[str, Any] | None, train_size: int) -> WeightAttackRecipe:
        """As many steps as the owner's recipe took on ``train_size`` images, with its batch,
        learning rate, flips and label smoothing (the default recipe without one)."""
        if not recipe:
            return cls()
        batch = int(recipe.get("batch_size", cls.batch_size))
        return cls(
            steps=int(recipe.get("epochs", 1)) * -(-train_size // batch),
            batch_size=batch,
            scratch_lr=float(recipe.get("lr", cls.scratch_lr)),
            flips=bool(recipe.get("flips", False)),
            label_smoothing=float(recipe.get("label_smoothing", 0.0)),
        )


@dataclass
class WeightAttackResult:
    """One attack's outcome on the test split."""

    attack: str
    setting: str
    samples: int
    value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_share(split: Split, share: float, seed: int = 0) -> Split:
    """A random share of ``split`` (at least one sample per class present, seeded)."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"a data share must lie in (0, 1], got {share}")
    count = max(1, round(share * len(split)))
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    index = order[:count]
    return Split(f"{split.name}-{count}", split.inputs[index], split.labels[index])


def _weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The weight tensors an attacker clips: floating parameters with two or more dimensions."""
    return [p for p in model.parameters() if p.is_floating_point() and p.dim() >= 2]


@torch.no_grad()
def clip_weights(model: nn.Module, sigmas: float) -> nn.Module:
    """Clip each weight tensor of ``model`` to ``mean ± sigmas·std``, in place."""
    for weight in _weight_tensors(model):
        mean, std = weight.mean(), weight.std()
        weight.clamp_(mean - sigmas * std, mean + sigmas * std)
    return model


@torch.no_grad()
def replace_outliers(model: nn.Module, sigmas: float) -> int:
    """Set weights beyond ``mean ± sigmas·std`` of their tensor to its mean, in place; returns
    how many were replaced."""
    replaced = 0
    for weight in _weight_tensors(model):
        mean, std = weight.mean(), weight.std()
        outliers = (weight - mean).abs() > sigmas * std
        weight[outliers] = mean
        replaced += int(outliers.sum())
    return replaced


def sealed_weight_attacks(
    build: Callable[[], nn.Module],
    shipped: dict[str, torch.Tensor],
    train: Split,
    test: Split,
    task: Task,
    *,
    shares: Sequence[float] = SHARES,
    clip_sigmas: Sequence[float] = CLIP_SIGMAS,
    replace_sigma: float = REPLACE_SIGMA,
    recipe: WeightAttackRecipe | None = None,
    withheld: Sequence[str] = (),
    input_scale: float = 1.0,
    as_loaded: Sequence[float] | None = None,
    replace_then_tune: bool = True,
    progress: bool = True,
) -> list[WeightAttackResult]:
    """Run every attack on the shipped weights, and the from-scratch baseline per share.

    Args:
        build: makes an untrained instance of the architecture.
        shipped: the bundle's plain weights (``model.safetensors``).
        train: the labelled data shares are drawn from; ``test``: where results are measured.
        withheld: tensors the plain file does not hold (zeros in it): the attacker initialises
            them at random.
        input_scale: the scale the lowest tier runs its inputs at (the shipped weights are
            measured there; the attacker trains and measures at full size).
        as_loaded: the shares at which to fine-tune the plain file as loaded, head included
            (default: every share); the new-head fine-tune and scratch run at every share.
        replace_then_tune: fine-tune after outlier replacement (on the largest share); the
            replaced weights are measured as they are either way.
    """
    recipe = recipe or WeightAttackRecipe()

    def shipped_model(reset_head: bool = False) -> nn.Module:
        model = build()
        fresh = {k: v.clone() for k, v in model.state_dict().items()}
        head = _head_prefix(model) if reset_head else None
        model.load_state_dict(
            {
                k: fresh[k] if k in withheld or (head and k.startswith(head)) else v
                for k, v in shipped.items()
            }
        )
        return model

    def trained(model: nn.Module, data: Split, lr: float, label: str) -> float:
        batch = min(recipe.batch_size, len(data))
        epochs = max(1, round(recipe.steps / -(-len(data) // batch)))
        train_model(
            model,
            data,
            epochs=epochs,
            lr=lr,
            optimizer="adamw",
            batch_size=batch,
            read_logits=task.logits,
            progress=progress,
            description=label,
            flips=recipe.flips,
            label_smoothing=recipe.label_smoothing,
        )
        return task.measure(model, test.inputs, test.labels)

    from nnobfuscator.strategies.input_resolution import resize_input

    scaled = resize_input(test.inputs, input_scale)
    with_plain = shipped_model()
    results = [
        WeightAttackResult(
            "none", "shipped weights", 0, task.measure(with_plain, scaled, test.labels)
        )
    ]
    for sigmas in clip_sigmas:
        clipped = clip_weights(shipped_model(), sigmas)
        results.append(
            WeightAttackResult("clip", f"t={sigmas:g}", 0, task.measure(clipped, *_xy(test)))
        )
    for share in shares:
        data = sample_share(train, share, recipe.seed)
        if as_loaded is None or share in as_loaded:
            torch.manual_seed(recipe.seed)
            value = trained(shipped_model(), data, recipe.finetune_lr, f"fine-tune on {len(data)}")
            results.append(WeightAttackResult("fine-tune", f"{share:.0%}", len(data), value))
        torch.manual_seed(recipe.seed)
        value = trained(
            shipped_model(reset_head=True),
            data,
            recipe.finetune_lr,
            f"fine-tune, new head, on {len(data)}",
        )
        results.append(WeightAttackResult("fine-tune (new head)", f"{share:.0%}", len(data), value))
        torch.manual_seed(recipe.seed)
        value = trained(build(), data, recipe.scratch_lr, f"from scratch on {len(data)}")
        results.append(WeightAttackResult("scratch", f"{share:.0%}", len(data), value))
    model = shipped_model()
    replaced = replace_outliers(model, replace_sigma)
    results.append(
        WeightAttackResult(
            "replace",
            f"t={replace_sigma:g}, {replaced} weights",
            0,
            task.measure(model, *_xy(test)),
        )
    )
    if not replace_then_tune:
        return results
    data = sample_share(train, max(shares), recipe.seed)
    torch.manual_seed(recipe.seed)
    value = trained(model, data, recipe.finetune_lr, f"replace + fine-tune on {len(data)}")
    results.append(
        WeightAttackResult(
            "replace+fine-tune",
            f"t={replace_sigma:g}, {replaced} weights, {max(shares):.0%}",
            len(data),
            value,
        )
    )
    return results


def _head_prefix(model: nn.Module) -> str | None:
    """The name prefix of the model's last ``nn.Linear`` (its classifier head), if any."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return f"{names[-1]}." if names else None


def _xy(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    return split.inputs, split.labels


def attack_bundle(
    directory: Any, *, progress: bool = True, train_steps: int | None = None, **options: Any
) -> tuple[dict[str, Any], list[WeightAttackResult]]:
    """Run :func:`sealed_weight_attacks` on a sealed bundle, with the data and architecture it
    records; returns the bundle's manifest and the results.

    Raises:
        SealError: not a bundle, or one without a recorded architecture and data source.
    """
    from nnobfuscator.jobs.sources import SourceError, build_architecture, load_split
    from nnobfuscator.security.sealing import SealError, read_manifest, shipped_weights
    from nnobfuscator.tasks import get_task

    manifest = read_manifest(directory)
    source = manifest.get("source", {})
    if "model" not in source or not source.get("data"):
        raise SealError(
            f"{directory} does not record its architecture and data; call "
            "sealed_weight_attacks() in Python with your own"
        )
    if manifest["task"] != "classification":
        raise SealError("attacks on sealed weights cover classification models")
    shipped = shipped_weights(directory)
    try:
        train = load_split(source["data"], "train")
        test = load_split(source["data"], "test")
    except SourceError as err:
        raise SealError(f"the attacker's share is drawn from a 'train' split: {err}") from None
    lowest = manifest["tiers"][0]
    recipe = options.pop("recipe", None) or WeightAttackRecipe.from_training(
        manifest.get("base_recipe"), len(train)
    )
    if train_steps is not None:
        recipe = replace(recipe, steps=train_steps)
    results = sealed_weight_attacks(
        lambda: build_architecture(source["model"], shipped),
        shipped,
        train,
        test,
        get_task(manifest["task"]),
        recipe=recipe,
        withheld=lowest.get("withheld", []),
        input_scale=float(lowest.get("input_scale", 1.0)),
        progress=progress,
        **options,
    )
    return manifest, results
