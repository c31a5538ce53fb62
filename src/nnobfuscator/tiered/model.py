"""``TieredModel``: one wrapped model, many quality tiers, the tier chosen per call."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnobfuscator.core import serialization
from nnobfuscator.core.diffusion import as_module
from nnobfuscator.core.key_derivation import key_id
from nnobfuscator.core.outputs import batch_size, main_input
from nnobfuscator.core.secret_key import find_key, store_key
from nnobfuscator.core.tier_pass import TierContext
from nnobfuscator.core.tiers import Tier
from nnobfuscator.core.wrapping import Host, unwrapped_name, wrap_max_pooling
from nnobfuscator.strategies import ComputeStrategy, Strategy, get_strategy
from nnobfuscator.strategies.base import strategy_config
from nnobfuscator.strategies.options import StrategyConfig
from nnobfuscator.tiered.executor import TierExecutor, as_call


@dataclass
class InputSpec:
    """The image input a model expects: ``(N, channels, height, width)``; ``None`` means any."""

    channels: int | None = None
    height: int | None = None
    width: int | None = None

    def check(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor batch, got {type(x).__name__}")
        want = f"(N, {self.channels or 'C'}, {self.height or 'H'}, {self.width or 'W'})"
        if x.dim() != 4:
            raise ValueError(f"expected a 4-d image batch {want}, got shape {tuple(x.shape)}")
        for axis, expected in ((1, self.channels), (2, self.height), (3, self.width)):
            if expected is not None and x.shape[axis] != expected:
                raise ValueError(f"expected input of shape {want}, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("empty batch: send at least one sample")


def model_fingerprint(model: nn.Module) -> str:
    """A digest of a model's weights, independent of the wrappers a TieredModel adds."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(unwrapped_name(name).encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:24]


class TieredModel(nn.Module):
    """A trained model served at several quality tiers from one copy of its weights.

    The user's model is wrapped, not copied, and stays reachable as ``base_model``; target layers
    are wrapped in place (PEFT style, original kept as ``base_layer``) and :meth:`unload` undoes it.
    Calibrated parameters live in ``tiers[name].params`` and nowhere else.

    Call it as ``model(x, tier="free")`` or ``model(x, tiers=["free", "premium", ...])`` for a mixed
    batch; keyword inputs (``input_ids=...``) work too. Without a tier argument the notebook default
    (:meth:`set_tier`, :meth:`use_tier`) is used, and failing that the *lowest* tier, so a forgotten
    argument never gives away quality.
    """

    def __init__(
        self,
        base_model: nn.Module,
        tiers: Sequence[Tier],
        strategies: Sequence[StrategyConfig | dict[str, Any]],
        key: bytes,
        *,
        task: str = "classification",
        model_name: str = "model",
        input_spec: InputSpec | None = None,
        meta: dict[str, Any] | None = None,
        base_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        if len(tiers) < 1:
            raise ValueError("a tiered model needs at least one tier")
        self.base_fingerprint = base_fingerprint or model_fingerprint(base_model)
        self.base_model = base_model
        self.key = key
        self.task = task
        self.model_name = model_name
        self.input_spec = input_spec
        self.meta = dict(meta or {})
        self.context = TierContext()
        self.tiers: dict[str, Tier] = {tier.name: tier for tier in tiers}
        self.host = Host(base_model, self.context, self.tiers)
        self._default_tier: str | None = None
        self._tier_override: ContextVar[str | None] = ContextVar(
            f"nnobf_use_{id(self)}", default=None
        )
        self.strategies: dict[str, Strategy] = {}
        # Degrading strategies wrap layers first, compute strategies then wrap whole blocks, so
        # layer names stay the plain module names whatever the combination.
        specs = sorted(
            (strategy_config(spec) for spec in strategies),
            key=lambda spec: get_strategy(spec.name).role == "compute",
        )
        for spec in specs:
            strategy = get_strategy(spec.name)(key, spec)
            strategy.attach(self.host)
            self.strategies[strategy.name] = strategy
        wrap_max_pooling(self.host)
        for tier in self.tiers.values():
            for name, params in list(tier.params.items()):
                if name in self.strategies:
                    tier.params[name] = self.strategies[name].check_params(params)
        self.executor = TierExecutor(base_model, self.context, self.tiers, self.strategies)

    def unload(self) -> nn.Module:
        """Remove every wrapper and return the original model, exactly as it was."""
        for strategy in self.strategies.values():
            strategy.detach()
        self.strategies.clear()
        return self.host.unload()

    @property
    def degrading(self) -> dict[str, Strategy]:
        """The strategies that lower utility by a strength (one shared knob per tier)."""
        return {n: s for n, s in self.strategies.items() if s.role != "compute"}

    @property
    def compute(self) -> dict[str, ComputeStrategy]:
        """The strategies that make tiers cheaper by a discrete setting."""
        return {n: s for n, s in self.strategies.items() if isinstance(s, ComputeStrategy)}

    # --- tiers -------------------------------------------------------------------------------
    @property
    def tier_names(self) -> list[str]:
        """Tier names, lowest utility first."""
        return list(self.tiers)

    def get_tier(self, name: str) -> Tier:
        try:
            return self.tiers[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown tier {name!r}; this model has {self.tier_names}") from None

    def set_params(self, tier: str, strategy: str, params: dict[str, Any]) -> None:
        """Set one strategy's calibrated parameters at ``tier`` (validated by the strategy)."""
        if strategy not in self.strategies:
            raise ValueError(
                f"{strategy!r} is not a strategy of this model: {list(self.strategies)}"
            )
        self.get_tier(tier).params[strategy] = self.strategies[strategy].check_params(params)

    def set_strength(self, tier: str, strategy: str, strength: float) -> None:
        """Set a tier's strength for one degrading strategy (what calibration does)."""
        self.set_params(tier, strategy, {"strength": strength})

    def set_setting(self, tier: str, strategy: str, setting: dict[str, Any]) -> None:
        """Set a tier's setting for one compute strategy (what calibration does)."""
        if strategy not in self.compute:
            raise ValueError(
                f"{strategy!r} is not a compute strategy of this model: {list(self.compute)}"
            )
        self.set_params(tier, strategy, setting)

    def tier_strategy(self, tier: str) -> str:
        """The strategies that act at ``tier``, joined with ``+`` (``"none"`` when none does)."""
        if self.get_tier(tier).is_full:
            return "none"
        active = [n for n, s in self.strategies.items() if s.is_active(tier)]
        return "+".join(active) or "none"

    def is_calibrated(self, tier: str) -> bool:
        info = self.get_tier(tier)
        return info.is_full or all(name in info.params for name in self.strategies)

    def set_tier(self, tier: str | None) -> None:
        """Notebook convenience: the tier used when a call names none (``None`` resets)."""
        if tier is not None:
            self.get_tier(tier)
        self._default_tier = tier

    @contextmanager
    def use_tier(self, tier: str) -> Iterator[None]:
        """Notebook convenience: calls without a tier argument use ``tier`` inside the block."""
        self.get_tier(tier)
        token = self._tier_override.set(tier)
        try:
            yield
        finally:
            self._tier_override.reset(token)

    @contextmanager
    def disable_tiers(self) -> Iterator[None]:
        """Notebook convenience: calls without a tier argument run the untouched model."""
        token = self._tier_override.set("__full__")
        try:
            yield
        finally:
            self._tier_override.reset(token)

    def _resolve_tier(self, tier: str | None) -> str | None:
        chosen = tier or self._tier_override.get() or self._default_tier or self.tier_names[0]
        if chosen == "__full__":
            return None
        self.get_tier(chosen)
        return chosen

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        *args: Any,
        tier: str | None = None,
        tiers: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model at one tier, or at a tier per sample (``tiers``, one per sample)."""
        if self.input_spec is not None:
            self.input_spec.check(main_input(args, kwargs))
        if tiers is None:
            return self.executor.run(self._resolve_tier(tier), *args, **kwargs)
        if tier is not None:
            raise ValueError("pass either tier= (whole batch) or tiers= (one per sample), not both")
        return self.executor.run_mixed(tiers, *args, **kwargs)

    def generate(
        self,
        *args: Any,
        tier: str | None = None,
        tiers: Sequence[str] | None = None,
        seed: int | Sequence[int] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The model's own ``generate`` (a causal LM's) at one tier, or at a tier per row
        (``tiers``) in one call: each row decodes at its tier, token for token what its tier
        gives alone (see :meth:`TierExecutor.generate`).

        Args:
            seed: with ``do_sample=True``, one seed for every row or one per row: each row then
                samples from its own stream (:mod:`nnobfuscator.tiered.sampling`), so the same
                prompt, seed and tier give the same text whatever shares the batch.

        Raises:
            TypeError: the model has no ``generate``.
            ValueError: beam search or several sequences per row (rows would change places).
        """
        generate = getattr(self.base_model, "generate", None)
        if not callable(generate):
            raise TypeError(
                f"{type(self.base_model).__name__} has no generate(): tiers of a causal LM "
                "(a transformers model with a generation mixin) generate; call the model instead"
            )
        for option in ("num_beams", "num_return_sequences"):
            if int(kwargs.get(option) or 1) != 1:
                raise ValueError(f"{option}={kwargs[option]} is not supported with tiers; use 1")
        count = batch_size(main_input(*as_call(args, kwargs)))
        if seed is not None and kwargs.get("do_sample"):
            from nnobfuscator.tiered.sampling import seeded_call

            seeds = [seed] * count if isinstance(seed, int) else list(seed)
            if len(seeds) != count:
                raise ValueError(f"seed= needs one seed or one per row: {len(seeds)} for {count}")
            kwargs = seeded_call(seeds, kwargs)
        if tiers is None:
            tiers = [self._resolve_tier(tier)] * count  # type: ignore[list-item]
        elif tier is not None:
            raise ValueError("pass either tier= (every row) or tiers= (one per row), not both")
        else:
            tiers = [self._resolve_tier(name) for name in tiers]
        with self.host.cache.holding():  # the tiers' slices serve every step of the call
            return self.executor.generate(tiers, generate, *args, **kwargs)

    def forward_tier(self, x: Any, tier: str | None, *args: Any, **kwargs: Any) -> Any:
        """Run the whole batch at ``tier`` (``None`` or a ``full`` tier: the untouched model)."""
        return self.executor.run(tier, x, *args, **kwargs)

    # --- status ------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """One row per tier: target, strategy, calibrated parameters, metrics, cost."""
        return [
            {
                "tier": tier.name,
                "target": tier.target.spec,
                "target_value": tier.target_value,
                "strategy": self.tier_strategy(tier.name),
                "params": {} if tier.is_full else tier.params,
                "metrics": tier.metrics,
                "relative_cost": tier.relative_cost,
                "calibrated": self.is_calibrated(tier.name),
            }
            for tier in self.tiers.values()
        ]

    def describe(self) -> dict[str, Any]:
        """Model-level facts: task, model, key id, strategies and the layers each acts on."""
        return {
            "task": self.task,
            "model": self.model_name,
            "key_id": key_id(self.key),
            "base_fingerprint": self.base_fingerprint,
            "input_spec": asdict(self.input_spec) if self.input_spec else None,
            "strategies": {n: s.config()["targets"] or [] for n, s in self.strategies.items()},
        }

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this tiered model holds, each tensor counted once.

        ``model``: the user's parameters and buffers; ``keyed``: strategy state (mixers, noise,
        per-tier statistics); ``caches``: derived tensors kept for speed (bounded); ``total``.
        """
        seen: set[int] = set()

        def count(tensors: Any) -> int:
            total = 0
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    total += tensor.numel() * tensor.element_size()
            return total

        model = count(self.base_model.state_dict(keep_vars=True).values())
        keyed = sum(
            count([*s.derived_tensors().values(), *s.state_tensors().values()])
            for s in self.strategies.values()
        )
        caches = self.host.cache.nbytes
        return {"model": model, "keyed": keyed, "caches": caches, "total": model + keyed + caches}

    # --- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, passphrase: str | None = None) -> Path:
        """Write config JSON + safetensors + a README card (see ``nnobfuscator.core.serialization``).

        The secret key is not written in plain: it goes to this machine's key ring, and, with a
        ``passphrase`` (or ``NNOBF_PASSPHRASE``), encrypted into the artifact as ``key.enc.json``
        (see ``nnobfuscator.core.secret_key``).
        """
        config = {
            **{k: v for k, v in self.describe().items() if k != "strategies"},
            "strategies": [
                {**strategy.config(), "fingerprint": strategy.fingerprint()}
                for strategy in self.strategies.values()
            ],
            "tiers": [tier.to_dict() for tier in self.tiers.values()],
            "meta": self.meta,
        }
        tensors: dict[str, torch.Tensor] = {}
        for strategy in self.strategies.values():
            tensors.update(strategy.state_tensors())
        path = serialization.write_artifact(directory, config, tensors)
        store_key(self.key, path, passphrase)
        return path

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        base_model: Any,
        *,
        check_base: bool = True,
        key: bytes | str | None = None,
        passphrase: str | None = None,
    ) -> TieredModel:
        """Load an artifact onto ``base_model`` (the same trained weights it was calibrated on:
        a model, or the diffusers pipeline).

        Args:
            key, passphrase: where the secret key comes from when it is not in this machine's key
                ring or ``NNOBF_MODEL_KEY`` (see ``nnobfuscator.core.secret_key``).

        Raises:
            ArtifactError: corrupt files, a different base model (when ``check_base``), or keyed
                state that does not re-derive identically.
            KeyNotFoundError: no source holds the artifact's secret key.
        """
        config, tensors = serialization.read_artifact(directory)
        base_model = as_module(base_model, config.get("meta", {}).get("call_options"))
        fingerprint = model_fingerprint(base_model)
        if check_base and fingerprint != config["base_fingerprint"]:
            raise serialization.ArtifactError(
                f"the base model does not match the artifact {directory}: its weights fingerprint "
                f"is {fingerprint}, the artifact was calibrated on {config['base_fingerprint']}. "
                "Load the same trained weights (or pass check_base=False if you know what you "
                "are doing)."
            )
        legacy = tensors.pop("key", None)
        key = find_key(
            Path(directory),
            str(config.get("key_id")),
            key=key,
            passphrase=passphrase,
            legacy=None if legacy is None else bytes(legacy.tolist()),
        )
        spec = config.get("input_spec")
        model = cls(
            base_model,
            [Tier.from_dict(t) for t in config["tiers"]],
            [
                {k: v for k, v in saved.items() if k != "fingerprint"}
                for saved in config["strategies"]
            ],
            key,
            task=config["task"],
            model_name=config.get("model", "model"),
            input_spec=InputSpec(**spec) if spec else None,
            meta=config.get("meta", {}),
            base_fingerprint=fingerprint,
        )
        for saved in config["strategies"]:
            strategy = model.strategies[saved["name"]]
            strategy.load_state_tensors(tensors)
            if strategy.fingerprint() != saved["fingerprint"]:
                if saved["name"] == "logit-noise" and str(config["version"]).startswith("0.2."):
                    raise serialization.ArtifactError(
                        f"{directory} was written by nnobfuscator {config['version']}, whose "
                        "logit-noise drew noise from a digest of each input (voting over "
                        "changed copies undid it); this version derives it from the top two "
                        "classes: calibrate the model again (nnobf calibrate)"
                    )
                raise serialization.ArtifactError(
                    f"{directory}: strategy {saved['name']!r} re-derives different keyed state "
                    "(corrupt tensors, or a torch version with another random generator)"
                )
        return model
