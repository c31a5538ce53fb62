"""Typed options of a strategy: one dataclass per strategy, validated once on construction.

The same class reads a strategy's options from a user (``obfuscate(model,
strategy=FeatureMixConfig(block=64))``, a plan's ``strategy: {name: feature-mix, block: 64}``)
and from a saved artifact, and writes them back (:meth:`StrategyConfig.to_dict`), so what is
saved is what is validated. A strategy with options of its own subclasses it
(``FeatureMixConfig``) and names it in ``Strategy.config_class``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass
class StrategyConfig:
    """Options every strategy takes.

    Args:
        name: the registered strategy (``nnobf strategies`` lists them); a strategy's own
            config class sets it.
        targets: module-name patterns (``fnmatch``) of the layers to act on; ``None`` picks the
            strategy's default.
    """

    name: str = ""
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the options; subclasses extend it for their own.

        Raises:
            ValueError: an option of the wrong type or out of range, with what it accepts.
        """
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a strategy config needs the strategy's name, e.g. 'class-merge'")
        if self.targets is not None:
            if isinstance(self.targets, str) or not all(
                isinstance(t, str) and t for t in self.targets
            ):
                raise ValueError(
                    f"{self.name} targets must be a list of module-name patterns, e.g. "
                    f"['layer4.*'], got {self.targets!r}"
                )
            self.targets = list(self.targets)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-ready values, ``name`` first (what an artifact saves)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StrategyConfig:
        """Options read from a mapping (a saved artifact, a plan), validated.

        Raises:
            ValueError: an option this strategy does not take (the error lists those it does),
                or an invalid value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"strategy {data.get('name', cls.__name__)!r} got unknown options {unknown}; "
                f"it takes {sorted(known - {'name'})}"
            )
        return cls(**data)
