"""The serving policy: predefined conditions that pick the tier each request is served at.

A YAML file (``nnobf serve --policy policy.yaml``), validated against the served model's tiers,
with errors that name the line. Example::

    tiers:
      free:  {rate: 60/min, quota: 1000/day, token_quota: 20000/day, on_exhausted: reject}
      pro:   {rate: 600/min, quota: 5000/day, on_exhausted: {downgrade: free}}
      "*":   {rate: 600/min}                  # every tier not named
    keys:                                     # per-key overrides, by key name or id
      alice: {quota: 20000/day}
    brownout:                                 # under load, serve chosen tiers lower
      signal: queue_wait_p95_ms               # or queue_depth, batch_p95_ms
      above: 200                              # turns on above this
      below: 50                               # and off again below this (hysteresis)
      hold_s: 5                               # ...once it has stayed there 5 s (default 0)
      serve: {pro: free, free: lite}          # tiers not named (premium) are never touched
    schedules:                                # UTC windows that change a tier's served tier
      - {name: weekend, days: [sat, sun], from: "00:00", to: "24:00", serve: {free: pro}}
    priority: true                            # batch higher tiers first under load

A request's tier goes through, in order: its key's tier (or a lower one it asks for), the first
schedule in force, the rate limit (429 when over), the quota (429, or the ``downgrade`` tier once
exhausted) and brownout. Each step that changes the tier adds its reason (``schedule``,
``quota``, ``load``) to the answer. A text-generation request is then charged its prompt plus
``max_tokens`` against the ``token_quota`` (429 when they do not fit; what it did not use is
given back when it ends).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
SIGNALS = ("queue_wait_p95_ms", "queue_depth", "batch_p95_ms")
_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")


class PolicyError(ValueError):
    """A policy file that cannot be used: what is wrong and on which line."""

    def __init__(self, message: str, line: int | None = None, source: str = "policy") -> None:
        where = f"{source}, line {line}" if line is not None else source
        super().__init__(f"{where}: {message}")
        self.line = line


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Downgrade(_Strict):
    downgrade: str = Field(description="The tier served once the quota is used up.")


class Rule(_Strict):
    """Limits of a tier, or of one key (a key's rule overrides its tier's, field by field)."""

    rate: str | None = Field(
        None, description="Requests per window per key, e.g. '60/min'; 'none' lifts a default."
    )
    quota: str | None = Field(
        None, description="Requests per window per key, e.g. '1000/day'; 'none' lifts a default."
    )
    on_exhausted: Literal["reject"] | Downgrade | None = Field(
        None, description="'reject' (429) or {downgrade: TIER} once the quota is used up."
    )
    token_quota: str | None = Field(
        None,
        description="Prompt plus completion tokens per window per key (text generation), e.g. "
        "'20000/day'; used up: 429. 'none' lifts a default.",
    )

    @field_validator("rate", "quota", "token_quota", mode="before")
    @classmethod
    def _limit_text(cls, value: Any) -> str | None:
        """A valid limit, or ``None`` for ``none`` / ``unlimited`` / ``off``."""
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(
                f"{value!r} is not a limit: write COUNT/PERIOD, e.g. 60/min or 1000/day"
            )
        from nnobfuscator.serving.limiter import parse_optional_limit

        return None if parse_optional_limit(value) is None else value

    @model_validator(mode="after")
    def _exhausted_needs_quota(self) -> Rule:
        fields = self.model_fields_set
        if "on_exhausted" in fields and "quota" in fields and self.quota is None:
            raise ValueError("on_exhausted is set but the quota is 'none'")
        return self


class Brownout(_Strict):
    signal: Literal["queue_wait_p95_ms", "queue_depth", "batch_p95_ms"] = "queue_wait_p95_ms"
    above: float = Field(gt=0, description="Brownout turns on when the signal exceeds this.")
    below: float = Field(ge=0, description="...and off when it falls to this or under.")
    window_s: float = Field(10.0, gt=0, description="Seconds of history the signal covers.")
    hold_s: float = Field(
        0.0, ge=0, description="...and only after it has stayed there this many seconds."
    )
    serve: dict[str, str] = Field(
        min_length=1, description="Tier -> lower tier served while browned out."
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> Brownout:
        if self.below >= self.above:
            raise ValueError(f"below ({self.below:g}) must be lower than above ({self.above:g})")
        return self


class Schedule(_Strict):
    name: str
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = list(DAYS)  # type: ignore[assignment]
    start: str = Field("00:00", alias="from", description="UTC HH:MM, inclusive.")
    end: str = Field("24:00", alias="to", description="UTC HH:MM, exclusive (24:00: midnight).")
    serve: dict[str, str] = Field(
        min_length=1, description="Tier -> tier served inside the window."
    )

    @field_validator("start", "end", mode="before")
    @classmethod
    def _clock(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(
                f"{value!r} is not a UTC time: write it in quotes, e.g. '08:00' (YAML reads an "
                "unquoted 08:00 as a number)"
            )
        if not _CLOCK.match(value):
            raise ValueError(f"{value!r} is not a UTC time HH:MM (00:00 to 24:00)")
        return value

    @model_validator(mode="after")
    def _window(self) -> Schedule:
        if not self.days:
            raise ValueError(f"schedule {self.name!r} has no days")
        if self.start == self.end:
            raise ValueError(
                f"schedule {self.name!r} starts and ends at {self.start}: an empty window"
            )
        return self

    def covers(self, now: datetime) -> bool:
        """Whether ``now`` (UTC) falls in the window; a window whose end is before its start
        runs past midnight (its days are the days it starts)."""
        now = now.astimezone(UTC)
        start, end = _minutes(self.start), _minutes(self.end)
        minute = now.hour * 60 + now.minute
        day = DAYS[now.weekday()]
        if start <= end:
            return day in self.days and start <= minute < end
        yesterday = DAYS[(now.weekday() - 1) % 7]
        return (day in self.days and minute >= start) or (yesterday in self.days and minute < end)


class PolicySpec(_Strict):
    tiers: dict[str, Rule] = Field(default_factory=dict)
    keys: dict[str, Rule] = Field(default_factory=dict)
    brownout: Brownout | None = None
    schedules: list[Schedule] = Field(default_factory=list)
    priority: bool = True

    @model_validator(mode="after")
    def _unique_schedules(self) -> PolicySpec:
        names = [s.name for s in self.schedules]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"schedule names must be unique; used twice: {', '.join(twice)}")
        return self


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


@dataclass(frozen=True)
class Policy:
    """A validated policy bound to the served model's tiers (lowest first)."""

    spec: PolicySpec
    tiers: tuple[str, ...]
    source: str = "policy"
    #: merged rules by (tier, key refs): the policy never changes, and decisions run per request
    _merged: dict[tuple, Rule] = field(default_factory=dict, repr=False, compare=False)

    def rule(self, tier: str, key_refs: tuple[str, ...] = ()) -> Rule:
        """The limits of a key at ``tier``: its own rule over the tier's (``*`` for tiers not
        named)."""
        base = self.spec.tiers.get(tier) or self.spec.tiers.get("*") or Rule()
        overrides = [self.spec.keys[ref] for ref in reversed(key_refs) if ref in self.spec.keys]
        if not overrides:
            return base
        merged = self._merged.get((tier, key_refs))
        if merged is None:
            fields = base.model_dump(exclude_unset=True)
            for override in overrides:  # the id's rule, then the name's over it
                fields.update(override.model_dump(exclude_unset=True))
            merged = self._merged[(tier, key_refs)] = Rule.model_validate(fields)
        return merged

    def scheduled(self, tier: str, now: datetime) -> str | None:
        """The tier the first schedule in force at ``now`` serves ``tier`` at, if any."""
        for schedule in self.spec.schedules:
            if tier in schedule.serve and schedule.covers(now):
                return schedule.serve[tier]
        return None

    def rank(self, tier: str) -> int:
        return self.tiers.index(tier)

    def describe(self) -> dict[str, Any]:
        """The policy as JSON-ready data (for ``/v1/tiers`` and the owner page)."""
        return self.spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def default_policy(
    tiers: list[str],
    rate_limits: dict[str, Any] | None = None,
    token_quotas: dict[str, str | None] | None = None,
) -> Policy:
    """The policy without a file: per-tier rate limits (``--rate-limit``) and token quotas
    (``--token-quota``) only."""
    from nnobfuscator.serving.limiter import limit_from_rate

    rate_limits, token_quotas = rate_limits or {}, token_quotas or {}
    rules = {}
    for tier in [*rate_limits, *(t for t in token_quotas if t not in rate_limits)]:
        fields: dict[str, Any] = {}  # a tier named in one mapping takes the other's "*"
        if tier in rate_limits or "*" in rate_limits:
            limit = rate_limits.get(tier, rate_limits.get("*"))
            converted = limit_from_rate(limit)
            text = str(limit)  # as the user wrote it ("60/min") when the limits library reads it
            rate = text if "e" not in text and "." not in text else str(converted)
            fields["rate"] = None if converted is None else rate
        if tier in token_quotas or "*" in token_quotas:
            fields["token_quota"] = token_quotas.get(tier, token_quotas.get("*"))
        rules[tier] = Rule.model_validate(fields)
    return Policy(PolicySpec(tiers=rules), tuple(tiers), "default policy")


def load_policy(path: str | Path, tiers: list[str]) -> Policy:
    """Read, validate and bind a policy file.

    Raises:
        PolicyError: unreadable YAML, an unknown field, a bad value or a tier the model does
            not have; the message names the line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise PolicyError(f"cannot read the policy file: {err.strerror}", source=str(path)) from err
    return parse_policy(text, tiers, source=str(path))


def parse_policy(text: str, tiers: list[str], source: str = "policy") -> Policy:
    """Validate policy YAML ``text`` against the model's ``tiers`` (see :func:`load_policy`)."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(err, "problem", None) or str(err)
        raise PolicyError(f"not valid YAML: {problem}", line, source) from err
    lines: dict[tuple, int] = {}
    if root is not None:
        _record_lines(root, (), lines, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError("the policy must be a mapping (tiers:, keys:, brownout: ...)", 1, source)
    try:
        spec = PolicySpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(first["loc"])
        where = _field(loc)
        raise PolicyError(f"{where}: {_plain(first['msg'])}", _line_of(loc, lines), source) from err
    policy = Policy(spec, tuple(tiers), source)
    _check_tiers(policy, lines, source)
    return policy


def _plain(message: str) -> str:
    return message.removeprefix("Value error, ")


def _field(loc: tuple) -> str:
    """A validation error's location as the file names it (without pydantic's union tags)."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p == "Downgrade"))]
    return ".".join(parts) or "policy"


def _record_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int], source: str) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        names = [key.value for key, _ in node.value]
        for key, value in node.value:
            if names.count(key.value) > 1:
                raise PolicyError(
                    f"{key.value!r} appears twice in {'.'.join(map(str, path)) or 'the policy'}",
                    key.start_mark.line + 1,
                    source,
                )
            child = (*path, key.value)
            lines[child] = key.start_mark.line + 1
            _record_lines(value, child, lines, source)
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, value in enumerate(node.value):
            _record_lines(value, (*path, index), lines, source)


def _line_of(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for end in range(len(loc), -1, -1):
        key = tuple(loc[:end])
        if key in lines:
            return lines[key]
    return None


def _check_tiers(policy: Policy, lines: dict[tuple, int], source: str) -> None:
    """Every tier named exists; quota downgrades and brownout only go down."""
    known = policy.tiers
    listing = ", ".join(known)

    def fail(path: tuple, message: str) -> None:
        raise PolicyError(message, _line_of(path, lines), source)

    def check(path: tuple, tier: str) -> None:
        if tier not in known:
            fail(path, f"unknown tier {tier!r}; the served model's tiers are {listing}")

    def lower(path: tuple, tier: str, served: str, what: str) -> None:
        check((*path, tier), tier)
        check((*path, tier), served)
        if known.index(served) > known.index(tier):
            fail((*path, tier), f"{what} may only serve a lower tier: {tier} -> {served} is higher")

    for tier, rule in policy.spec.tiers.items():
        if tier != "*":
            check(("tiers", tier), tier)
        if isinstance(rule.on_exhausted, Downgrade):
            target = rule.on_exhausted.downgrade
            check(("tiers", tier, "on_exhausted", "downgrade"), target)
            if tier != "*" and known.index(target) >= known.index(tier):
                fail(
                    ("tiers", tier, "on_exhausted"),
                    f"a quota downgrade must serve a lower tier than {tier}, not {target}",
                )
    for ref, rule in policy.spec.keys.items():
        if isinstance(rule.on_exhausted, Downgrade):
            check(("keys", ref, "on_exhausted", "downgrade"), rule.on_exhausted.downgrade)
    if policy.spec.brownout is not None:
        for tier, served in policy.spec.brownout.serve.items():
            lower(("brownout", "serve"), tier, served, "brownout")
    for index, schedule in enumerate(policy.spec.schedules):
        for tier, served in schedule.serve.items():
            check(("schedules", index, "serve", tier), tier)
            check(("schedules", index, "serve", tier), served)


def utc_now() -> datetime:
    """The current time in UTC (the default clock of schedules)."""
    return datetime.now(UTC)
