"""Class merging: a lower tier answers at a coarser taxonomy, read out honestly.

A tier at strength ``s`` (in [0, 1]) merges ``s * (C - 1)`` of the model's ``C`` classes into
others: whole merges first, then a share of the next one. Merges follow one order for the whole
model, found on calibration data: each step joins the two groups of classes the full model
confuses most (a free tier's merges include the pro tier's: "tops", "footwear", ...). A merged
group is answered as one class, its representative (the group's largest class); its other members
are never answered.

The answer of a tier is not the model's head on changed features but a **readout** fit to that
tier: a linear discriminant projection of the head's input features onto as many directions as
the groups need, then a logistic regression over the groups, fit on the calibration split at the
tier's own compute setting. Two consequences, measured on Fashion-MNIST
(``benchmarks/RESULTS.md``):

- a user with a few hundred labels cannot *decode* more out of the answers than they show: the
  scores already are the best linear reading of what the tier keeps, and what a merge removes
  (which member of a group an input is) is not in them;
- a *knock-off* trained on the answers learns the merged taxonomy, a simple function of the
  input, and stays near the tier's face value, where tiers that only distort features (mixing,
  noise, skipped blocks read by the old head) teach a knock-off far more than they show.

The share of the next merge moves the least confident of the inputs the readout names as that
merge's class to the class it merges into (a threshold on the readout's score, set on the
calibration split), so utility falls continuously with the strength. Same input, same answer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nnobfuscator.core.tier_pass import TierContext, ordinary
from nnobfuscator.core.wrapping import Host, unwrapped_name
from nnobfuscator.strategies.base import Strategy, register_strategy
from nnobfuscator.strategies.bn_reestimate import find_store
from nnobfuscator.strategies.options import StrategyConfig

#: logit of a class a merged tier never answers (finite: softmax gives it 0, logs stay finite)
MASKED = -1e4
PREFIX = "class-merge"


@dataclass
class Readout:
    """One tier's answer at one merge level: ``logits = features @ weight.T + bias`` (``(C,)``
    classes, the merged-away ones masked), and the threshold of the partial next merge."""

    weight: torch.Tensor
    bias: torch.Tensor
    #: the readout's scores of the next merge's class, on calibration inputs it names that
    #: class, sorted (the partial merge's thresholds are their quantiles)
    confidences: torch.Tensor


def merge_order(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """The ``C - 1`` merges ``(merged class, class it merges into)``: each joins the two groups
    the predictions confuse most (ties: the lower class indices); a group is named by its
    representative, its class with the most samples (ties: the lower index)."""
    confusion = torch.zeros(classes, classes, dtype=torch.float64)
    confusion.index_put_((labels, predicted), torch.ones(len(labels), dtype=torch.float64), True)
    mixed = confusion + confusion.T
    counts = torch.bincount(labels, minlength=classes).double()
    alive = torch.ones(classes, dtype=torch.bool)
    merges = []
    for _ in range(classes - 1):
        pairs = mixed.clone()
        pairs[~alive] = -1.0
        pairs[:, ~alive] = -1.0
        pairs.fill_diagonal_(-1.0)
        pairs = pairs.triu(1) + torch.tril(torch.full_like(pairs, -1.0))
        i, j = divmod(int(pairs.argmax()), classes)
        keep, drop = (i, j) if counts[i] >= counts[j] else (j, i)
        mixed[keep] += mixed[drop]
        mixed[:, keep] += mixed[:, drop]
        counts[keep] += counts[drop]
        alive[drop] = False
        merges.append((drop, keep))
    return torch.tensor(merges, dtype=torch.long).reshape(-1, 2)


def groups_at(order: torch.Tensor, classes: int, level: int) -> torch.Tensor:
    """Each class's representative after the first ``level`` merges of ``order``."""
    group = torch.arange(classes)
    for drop, keep in order[:level].tolist():
        group[group == drop] = keep
    return group


def fit_readout(
    features: torch.Tensor, labels: torch.Tensor, classes: int, *, steps: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear readout ``(weight (C, D), bias (C,))`` of ``labels`` (group representatives)
    from ``features`` (``(N, D)``): the linear discriminant directions of the groups present
    (one fewer than there are groups), then a multinomial logistic regression on them; classes
    that are no group's representative get the masked bias."""
    x = features.detach().double().flatten(1)
    present = torch.unique(labels)
    weight = torch.zeros(classes, x.shape[1], dtype=torch.float64)
    bias = torch.full((classes,), MASKED, dtype=torch.float64)
    if len(present) == 1:
        bias[present] = 0.0
        return weight.float(), bias.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    index = torch.searchsorted(present, labels)
    centroids = torch.stack([z[index == g].mean(0) for g in range(len(present))])
    within = z - centroids[index]
    scatter = within.T @ within / len(z)
    scatter += 1e-3 * scatter.diagonal().mean() * torch.eye(len(scatter), dtype=scatter.dtype)
    shares = torch.bincount(index).double() / len(z)
    spread = (centroids - z.mean(0)) * shares.sqrt()[:, None]
    lower = torch.linalg.cholesky(scatter)
    whitened = torch.linalg.solve_triangular(lower, spread.T, upper=False)  # (D, groups)
    directions = torch.linalg.svd(whitened, full_matrices=False).U[:, : len(present) - 1]
    projection = torch.linalg.solve_triangular(lower.T, directions, upper=True)  # (D, r)
    projected = z @ projection
    scale = projected.std(0).clamp_min(1e-9)
    projected = projected / scale
    linear = nn.Linear(projected.shape[1], len(present)).double()
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(
        linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe"
    )

    def loss() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        value = F.cross_entropy(linear(projected), index) + 1e-4 * linear.weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    combined = linear.weight.detach() @ (projection / scale).T / std  # (G, D) on raw features
    weight[present] = combined
    bias[present] = linear.bias.detach() - combined @ mean
    return weight.float(), bias.float()


class TieredHead(nn.Module):
    """The model's head layer; at a tier with a readout, each sample's logits come from its
    tier's readout instead (one pass for a batch mixing tiers). The user's layer is
    ``base_layer`` and runs untouched otherwise."""

    def __init__(
        self, base_layer: nn.Module, context: TierContext, strategy: ClassMerge, name: str
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_name = name
        self._context = context
        self._strategy = [strategy]  # a list: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base_layer(x)
        state = self._context.state
        if state is None:
            return output
        tiers, index = state.groups()
        strategy = self._strategy[0]
        active = [(t, position) for position, t in enumerate(tiers) if strategy.answers(t)]
        if not active:
            return output
        if len(tiers) == 1:
            return strategy.read(tiers[0], x).to(output.dtype)
        output = output.clone()
        index = index.to(x.device)
        for tier, position in active:
            rows = (index == position).nonzero().flatten()
            output[rows] = strategy.read(tier, x[rows]).to(output.dtype)
        return output


@register_strategy
class ClassMerge(Strategy):
    """See the module docstring. ``targets``: the head layer (default: the model's last
    ``nn.Linear``, checked on calibration data to produce the model's output)."""

    name = "class-merge"
    kind = "head"
    max_strength = 1.0
    description = (
        "merges the classes the model confuses most into one answer (a coarser taxonomy), "
        "read out from the tier's own features: withholds what it does not show"
    )
    needs_labels: ClassVar[bool] = True

    def __init__(self, key: bytes, options: StrategyConfig | None = None) -> None:
        super().__init__(key, options)
        self.order: torch.Tensor | None = None
        self.classes: int | None = None
        #: per tier: the compute settings its readouts were fit at, and a readout per level
        self.readouts: dict[str, tuple[dict[str, Any], dict[int, Readout]]] = {}
        #: per tier, while calibrating: head features and labels to fit more levels on demand
        self._fitting: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- attaching -----------------------------------------------------------------------
    def attach(self, host: Host) -> None:
        self.host = host
        name = self._head_name(host.root)
        if name in host.wrappers:
            raise ValueError(
                f"class-merge reads the answers out of the head {name!r}, which another strategy "
                "already wraps: leave the head out of the other strategies' targets"
            )
        head = host.wrap(name, lambda child: TieredHead(child, host.context, self, name))
        self.layers[name] = head

    def _head_name(self, model: nn.Module) -> str:
        if self.target_patterns:
            if len(self.target_patterns) != 1 or "*" in self.target_patterns[0]:
                raise ValueError("class-merge takes one target: the name of the head layer")
            return self.target_patterns[0]
        linears = [unwrapped_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"class-merge found no nn.Linear head in {type(model).__name__}: pass "
                "targets=['name.of.head'] (a layer whose output is the class logits)"
            )
        return linears[-1]

    @property
    def head(self) -> TieredHead:
        return next(iter(self.layers.values()))  # type: ignore[return-value]

    def detach(self) -> None:
        self.layers.clear()

    # --- parameters ----------------------------------------------------------------------
    def level(self, tier: str) -> tuple[int, float]:
        """Whole merges and the share of the next one at ``tier``."""
        assert self.classes is not None
        merges = self.strength(tier) * (self.classes - 1)
        whole = min(int(math.floor(merges + 1e-9)), self.classes - 1)
        return whole, (merges - whole if whole < self.classes - 1 else 0.0)

    def is_active(self, tier: str) -> bool:
        return tier in self.readouts

    def pass_key(self, tier: str) -> Any:
        return None  # read per sample at the head: tiers always share a pass

    def signature(self, tier: str) -> Any:
        return None  # no weight of the model changes

    def answers(self, tier: str | None) -> bool:
        """Whether ``tier``'s answers come from a readout (the tier was calibrated with it)."""
        return tier is not None and tier in self.readouts

    # --- calibration ---------------------------------------------------------------------
    def head_inputs(self, run: Callable[[], Any]) -> torch.Tensor:
        """The head's inputs while ``run()`` runs (readouts of the tiers being run are
        bypassed: the features are what the tier's own layers produce)."""
        seen: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(
            lambda module, args: seen.append(args[0].detach().float())
        )
        try:
            run()
        finally:
            handle.remove()
        return torch.cat(seen)

    def fit_order(self, predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> None:
        """Fix the merge order from the full model's ``predicted`` classes on labelled
        calibration inputs."""
        self.classes = classes
        self.order = merge_order(predicted, labels, classes)

    def fit_tier(self, tier: str, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep ``tier``'s head features and labels (calibration data at its compute setting)
        and fit its readouts as levels are asked for."""
        if self.order is None:
            raise RuntimeError("class-merge: fit_order() must run before fit_tier()")
        if features.dim() != 2:
            raise ValueError(
                f"class-merge reads one feature vector per sample at the head; the head "
                f"{next(iter(self.layers))!r} gets inputs of shape {tuple(features.shape)}"
            )
        self._fitting[tier] = (features, labels)
        self.readouts[tier] = (self._compute_settings(tier), {})

    def forget(self, tier: str) -> None:
        """Drop ``tier``'s readouts (before fitting it again at another compute setting): it
        answers through the model's own head until then."""
        self.readouts.pop(tier, None)
        self._fitting.pop(tier, None)

    def finish(self) -> None:
        """Keep only the readouts the tiers use (calibration is over)."""
        for tier, (settings, levels) in self.readouts.items():
            whole, share = self.level(tier)
            used = [whole, whole + 1] if share > 0.0 else [whole]
            for level in used:
                self._readout(tier, level)
            self.readouts[tier] = (settings, {level: levels[level] for level in used})
        self._fitting.clear()

    def _readout(self, tier: str, level: int) -> Readout:
        settings, levels = self.readouts[tier]
        if settings != self._compute_settings(tier):
            raise RuntimeError(
                f"tier {tier!r}: its class-merge readout was fit at other compute settings; "
                "calibrate the model again"
            )
        if level not in levels:
            if tier not in self._fitting:
                raise RuntimeError(
                    f"tier {tier!r} has no class-merge readout at this strength (it was "
                    "calibrated at another); calibrate the model again"
                )
            levels[level] = self._fit_level(tier, level)
        return levels[level]

    def _fit_level(self, tier: str, level: int) -> Readout:
        assert self.order is not None and self.classes is not None
        features, labels = self._fitting[tier]
        groups = groups_at(self.order, self.classes, level)
        with torch.inference_mode(False):
            if level == 0 and not self._compute_settings(tier):
                # no merge on the model's own features: the model's own head is the readout
                # (a refit one could only lose what the head learned on the training data)
                own = self.head.base_layer
                weight = own.weight.detach().float().clone()
                bias = (
                    own.bias.detach().float().clone()
                    if own.bias is not None
                    else torch.zeros(len(weight), device=weight.device)
                )
            else:
                weight, bias = fit_readout(features, groups[labels], self.classes)
            confidences = torch.empty(0)
            if level < self.classes - 1:
                drop = int(self.order[level, 0])
                probabilities = (features @ weight.T + bias).softmax(dim=1)
                named = probabilities.argmax(dim=1) == drop
                confidences = probabilities[named, drop].sort().values
        return Readout(ordinary(weight), ordinary(bias), ordinary(confidences))

    def _compute_settings(self, tier: str) -> dict[str, Any]:
        store = find_store(self.host)
        return copy.deepcopy(store.compute_params(tier)) if store is not None else {}

    # --- answering -----------------------------------------------------------------------
    def read(self, tier: str, features: torch.Tensor) -> torch.Tensor:
        """``tier``'s logits ``(N, C)`` for head inputs ``features``.

        Between whole merges, inputs are answered by the next level's readout (the next merge
        done) except those the current level names as the next merge's class with a score
        above the tier's threshold: a share of that class, its least confident inputs, is
        merged, and the merged ones cannot be told apart from the rest of their new group.
        """
        whole, share = self.level(tier)
        current = self._logits(self._readout(tier, whole), features)
        if share <= 0.0:
            return current
        assert self.order is not None
        readout = self._readout(tier, whole)
        drop = int(self.order[whole, 0])
        probabilities = current.float().softmax(dim=1)
        kept = (probabilities.argmax(dim=1) == drop) & (
            probabilities[:, drop] > _quantile(readout.confidences, share)
        )
        merged = self._logits(self._readout(tier, whole + 1), features)
        return torch.where(kept[:, None], current, merged)

    @staticmethod
    def _logits(readout: Readout, features: torch.Tensor) -> torch.Tensor:
        weight = readout.weight.to(features.device, features.dtype)
        return features @ weight.T + readout.bias.to(features.device, features.dtype)

    def sealed_state(self, tier: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The head's weight and bias become the tier's readout. A plain layer cannot route
        between two readouts, so a tier between whole merges ships the next whole merge (never
        more than the tier answers); the manifest records the level."""
        if not self.answers(tier):
            return {}
        whole, share = self.level(tier)
        level = whole + 1 if share > 0.0 else whole
        readout = self._readout(tier, level)
        name = next(iter(self.layers))
        state[f"{name}.weight"] = readout.weight.detach().cpu().contiguous()
        state[f"{name}.bias"] = readout.bias.detach().cpu().contiguous()
        return {"merges": level}

    # --- persistence ---------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        if self.order is None:
            return tensors
        tensors[f"{PREFIX}/order"] = self.order.clone()
        for tier, (_, levels) in sorted(self.readouts.items()):
            for level, readout in sorted(levels.items()):
                stem = f"{PREFIX}/{tier}/{level}"
                tensors[f"{stem}/weight"] = readout.weight.contiguous()
                tensors[f"{stem}/bias"] = readout.bias.contiguous()
                tensors[f"{stem}/confidences"] = readout.confidences.contiguous()
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        order = tensors.get(f"{PREFIX}/order")
        if order is None:
            return
        self.order = order.long()
        self.classes = len(order) + 1
        for key, weight in tensors.items():
            parts = key.split("/")
            if len(parts) != 4 or parts[0] != PREFIX or parts[3] != "weight":
                continue
            stem = key[: -len("weight")]
            readout = Readout(
                weight.float(), tensors[stem + "bias"].float(), tensors[stem + "confidences"]
            )
            entry = self.readouts.setdefault(parts[1], (self._compute_settings(parts[1]), {}))
            entry[1][int(parts[2])] = readout

    def derived_tensors(self) -> dict[str, torch.Tensor]:
        return self.state_tensors()


def _quantile(values: torch.Tensor, share: float) -> float:
    """The score at or under which a ``share`` of ``values`` (sorted ascending) lie."""
    count = round(share * len(values))
    if count <= 0:
        return -math.inf
    return float(values[min(count, len(values)) - 1])
