"""Counting requests against rate limits and quotas, in memory or in Redis (``limits`` library).

A :class:`LimitStore` counts hits per ``(scope, identity, limit)``: ``scope`` says what is
counted (``"rate"``, ``"quota:classify"``...), ``identity`` whose (a key id, a tier). With
``"memory://"`` each process counts on its own; with ``"redis://host:port/db"`` every process and
Ray Serve replica that names the same Redis shares one count (Redis' atomic scripts from
``limits``, so concurrent replicas never both take the last request).

Rate limits (``kind="rate"``) use a moving window: at most ``amount`` hits in any span of the
period. Quotas (``kind="quota"``) use a fixed window aligned to the clock: ``"1000/day"`` resets
at 00:00 UTC, ``"100/hour"`` on the hour.

Example:
    >>> store = LimitStore("memory://")
    >>> state = store.hit("rate", "key-1", parse_limit("2/s"))
    >>> state.allowed, state.remaining
    (True, 1)
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, replace
from typing import Literal, get_args

from limits import (
    RateLimitItem,
    RateLimitItemPerDay,
    RateLimitItemPerHour,
    RateLimitItemPerMinute,
    RateLimitItemPerMonth,
    RateLimitItemPerSecond,
    RateLimitItemPerYear,
)
from limits.errors import ConfigurationError, StorageError
from limits.storage import Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from nnobfuscator.serving.config import RateLimit, check_store_uri, redact_uri

Kind = Literal["rate", "quota"]
Granularity = Literal["second", "minute", "hour", "day", "month", "year"]

_ITEMS: dict[str, type[RateLimitItem]] = {
    "second": RateLimitItemPerSecond,
    "minute": RateLimitItemPerMinute,
    "hour": RateLimitItemPerHour,
    "day": RateLimitItemPerDay,
    "month": RateLimitItemPerMonth,
    "year": RateLimitItemPerYear,
}
_UNITS = {
    **dict.fromkeys(["s", "sec", "secs", "second", "seconds"], "second"),
    **dict.fromkeys(["m", "min", "mins", "minute", "minutes"], "minute"),
    **dict.fromkeys(["h", "hr", "hrs", "hour", "hours"], "hour"),
    **dict.fromkeys(["d", "day", "days"], "day"),
    **dict.fromkeys(["month", "months"], "month"),
    **dict.fromkeys(["y", "year", "years"], "year"),
}
_LIMIT = re.compile(r"^\s*(\S+?)\s*(?:/|\s+per\s+)\s*(\d+)?\s*([a-z]+)\s*$")
_NONE = {"none", "unlimited", "off"}
_FORMS = (
    "write COUNT/PERIOD or COUNT per PERIOD with a whole COUNT >= 1 and PERIOD one of s, min, h, "
    "day, month, year, optionally with a multiple (e.g. '60/min', '600/h', '1000/day', "
    "'1000 per day', '5/30 seconds')"
)
_NAMESPACE = "nnobf"


class LimitStoreError(RuntimeError):
    """The limits store cannot be used (Redis unreachable, ``redis`` not installed...)."""


@dataclass(frozen=True)
class Limit:
    """``amount`` hits per ``multiples`` x ``granularity``, counted as a rate or as a quota.

    Args:
        amount: hits allowed per window.
        multiples: how many ``granularity`` units one window spans (``"5/30 seconds"``: 30).
        granularity: the unit of the window.
        kind: ``"rate"`` (moving window: never more than ``amount`` in any period) or
            ``"quota"`` (fixed window aligned to the clock: the count resets at the window edge).
    """

    amount: int
    multiples: int = 1
    granularity: Granularity = "second"
    kind: Kind = "rate"

    def __post_init__(self) -> None:
        if self.amount < 1 or self.multiples < 1:
            raise ValueError(f"a limit needs amount >= 1 and multiples >= 1, got {self!r}")
        if self.granularity not in _ITEMS:
            raise ValueError(f"unknown granularity {self.granularity!r}: use one of {_ITEMS}")
        if self.kind not in get_args(Kind):
            raise ValueError(f"unknown limit kind {self.kind!r}: use 'rate' or 'quota'")

    @property
    def seconds(self) -> int:
        """Length of one window in seconds (a month is 30 days, a year 365)."""
        return self.item().get_expiry()

    def item(self, namespace: str = _NAMESPACE) -> RateLimitItem:
        """The equivalent ``limits`` item."""
        return _ITEMS[self.granularity](self.amount, self.multiples, namespace=namespace)

    def as_kind(self, kind: Kind) -> Limit:
        """The same amount and window counted as ``kind``."""
        return replace(self, kind=kind)

    def __str__(self) -> str:
        unit = self.granularity if self.multiples == 1 else f"{self.multiples} {self.granularity}s"
        return f"{self.amount}/{unit}"


@dataclass(frozen=True)
class LimitState:
    """Where an identity stands against one limit.

    Args:
        allowed: the hit was counted (``hit``) or one more would be (``peek``).
        limit: hits allowed per window.
        remaining: hits left now.
        reset_at: epoch seconds when the window resets (quota) or the oldest counted hit leaves
            the moving window (rate; now when nothing is counted).
        retry_after: seconds until one more hit is allowed; 0 when allowed.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_at: float
    retry_after: float


def parse_limit(text: str, kind: Kind = "rate") -> Limit:
    """``"60/min"``, ``"600/h"``, ``"1000/day"``, ``"1000 per day"``, ``"5/30 seconds"`` -> Limit.

    Raises:
        ValueError: naming ``text`` and the accepted forms (also for ``"none"``: use
            :func:`parse_optional_limit` where unlimited is allowed).
    """
    match = _LIMIT.match(text.lower())
    if not match:
        raise ValueError(f"invalid limit {text!r}: {_FORMS}")
    count, multiples, unit = match.groups()
    if unit not in _UNITS:
        raise ValueError(f"invalid limit {text!r}: unknown period {unit!r}; {_FORMS}")
    if not count.isdigit() or int(count) < 1 or (multiples is not None and int(multiples) < 1):
        raise ValueError(f"invalid limit {text!r}: {_FORMS}")
    return Limit(int(count), int(multiples or 1), _UNITS[unit], kind)  # type: ignore[arg-type]


def parse_optional_limit(text: str, kind: Kind = "rate") -> Limit | None:
    """Like :func:`parse_limit`, with ``"none"``, ``"unlimited"`` or ``"off"`` -> ``None``."""
    if text.strip().lower() in _NONE:
        return None
    try:
        return parse_limit(text, kind)
    except ValueError as err:
        raise ValueError(f"{err}, or 'none' for unlimited") from None


def parse_token_quotas(spec: str) -> dict[str, str | None]:
    """``"free=20000/day,*=none"`` -> per-tier token quotas (``*`` is every other tier).

    Raises:
        ValueError: an item is not ``TIER=COUNT/PERIOD`` (or ``TIER=none``).
    """
    quotas: dict[str, str | None] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        tier, sep, text = item.partition("=")
        if not sep or not tier.strip():
            raise ValueError(f"invalid token quota item {item!r}: write TIER=COUNT/PERIOD")
        limit = parse_optional_limit(text.strip(), "quota")
        quotas[tier.strip()] = None if limit is None else text.strip()
    return quotas


def limit_from_rate(rate: RateLimit | None, kind: Kind = "rate") -> Limit | None:
    """The :class:`Limit` for a ``ServeConfig.rate_limits`` entry (``None`` stays unlimited)."""
    if rate is None:
        return None
    units = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}
    if rate.requests != round(rate.requests):  # 0.5/s: one per 2 seconds, the same mean rate
        return Limit(1, max(1, round(rate.period / rate.requests)), "second", kind)
    if rate.period in units:
        multiples, unit = 1, units[rate.period]
    else:
        multiples, unit = max(1, round(rate.period)), "second"
    return Limit(max(1, round(rate.requests)), multiples, unit, kind)  # type: ignore[arg-type]


class LimitStore:
    """Hit counters for rate limits and quotas, in this process or shared through Redis.

    Args:
        uri: ``"memory://"`` (this process only) or ``"redis://[:password@]host:port[/db]"``
            (every process and replica using the same Redis shares the counts).
        namespace: prefix of every counter (lets tests or deployments share one Redis).
        timeout: seconds to wait for Redis to connect or answer.

    Raises:
        ValueError: ``uri`` is not a limits store URI.
        LimitStoreError: Redis cannot be reached (the message names the URI, never a password).
    """

    def __init__(
        self, uri: str = "memory://", *, namespace: str = _NAMESPACE, timeout: float = 5.0
    ) -> None:
        self.uri = check_store_uri(uri)
        self.namespace = namespace
        self._shown = redact_uri(self.uri)
        options: dict[str, float] = {}
        if self.shared:
            options = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
        try:
            self._storage: Storage = storage_from_string(self.uri, wrap_exceptions=True, **options)
        except ConfigurationError as err:
            raise LimitStoreError(
                f"cannot use the limits store {self._shown}: {err} "
                "(pip install 'nnobfuscator[serve]' installs the redis client)"
            ) from None
        if self.shared:
            try:
                self._storage.get_connection().ping()  # type: ignore[attr-defined]
            except Exception as err:
                raise LimitStoreError(
                    f"cannot reach Redis at {self._shown}: {type(err).__name__}: "
                    f"{redact_uri(str(err)).rstrip('.')}. Start redis-server there, or serve with "
                    "--limits-store memory:// (limits then count per process)"
                ) from None
        self._moving = MovingWindowRateLimiter(self._storage)
        self._fixed = FixedWindowRateLimiter(self._storage)

    @property
    def shared(self) -> bool:
        """Whether the counts are shared across processes (Redis) rather than in memory."""
        return not self.uri.startswith("memory://")

    def __repr__(self) -> str:
        return f"LimitStore({self._shown!r}, namespace={self.namespace!r})"

    def hit(
        self, scope: str, identity: str, limit: Limit, cost: int = 1, *, at: float | None = None
    ) -> LimitState:
        """Count ``cost`` hits of ``identity`` against ``limit`` if they fit; nothing otherwise.

        Args:
            at: the epoch time the hits count at (a quota's window; default now).
        """
        if cost < 1:
            raise ValueError(f"cost must be at least 1, got {cost}")
        now = time.time() if at is None else at
        item, ids = limit.item(self.namespace), self._ids(scope, identity, limit, now)
        try:
            if limit.kind == "rate":
                allowed = self._moving.hit(item, *ids, cost=cost)
            else:
                allowed = self._fixed.hit(item, *ids, cost=cost)
                if not allowed:  # a fixed window counts refused hits too: take them back
                    self._storage.incr(item.key_for(*ids), item.get_expiry(), amount=-cost)
            return self._state(allowed, limit, item, ids, now)
        except StorageError as err:
            raise self._error(err) from None

    def refund(self, scope: str, identity: str, limit: Limit, amount: int, at: float) -> None:
        """Take back ``amount`` hits counted against a quota at epoch time ``at`` (what a
        reservation did not use). A rate's moving window cannot give hits back.

        Raises:
            ValueError: ``limit`` is a rate.
        """
        if limit.kind != "quota":
            raise ValueError("only hits counted against a quota can be given back")
        if amount < 1:
            return
        item, ids = limit.item(self.namespace), self._ids(scope, identity, limit, at)
        try:
            self._storage.incr(item.key_for(*ids), item.get_expiry(), amount=-amount)
        except StorageError as err:
            raise self._error(err) from None

    def peek(self, scope: str, identity: str, limit: Limit) -> LimitState:
        """Where ``identity`` stands against ``limit``, counting nothing."""
        item, ids, now = limit.item(self.namespace), self._ids(scope, identity, limit), time.time()
        try:
            return self._state(None, limit, item, ids, now)
        except StorageError as err:
            raise self._error(err) from None

    def clear(self, scope: str, identity: str, limit: Limit) -> None:
        """Forget the hits of ``identity`` against ``limit`` (the current quota window's)."""
        item, ids = limit.item(self.namespace), self._ids(scope, identity, limit)
        try:
            (self._moving if limit.kind == "rate" else self._fixed).clear(item, *ids)
        except StorageError as err:
            raise self._error(err) from None

    def _ids(
        self, scope: str, identity: str, limit: Limit, at: float | None = None
    ) -> tuple[str, ...]:
        if limit.kind == "rate":
            return (scope, identity)
        at = time.time() if at is None else at
        return (scope, identity, str(int(at // limit.seconds)))  # clock-aligned window

    def _state(
        self,
        allowed: bool | None,
        limit: Limit,
        item: RateLimitItem,
        ids: tuple[str, ...],
        now: float,
    ) -> LimitState:
        strategy = self._moving if limit.kind == "rate" else self._fixed
        stats = strategy.get_window_stats(item, *ids)
        remaining = max(0, min(limit.amount, stats.remaining))
        if allowed is None:  # peek
            allowed = remaining >= 1
        if limit.kind == "quota":
            reset_at = (int(ids[-1]) + 1) * float(limit.seconds)
        else:
            reset_at = stats.reset_time if remaining < limit.amount else now
        retry_after = 0.0 if allowed else max(reset_at - time.time(), 1e-3)
        return LimitState(allowed, limit.amount, remaining, reset_at, retry_after)

    def _error(self, err: StorageError) -> LimitStoreError:
        cause = err.storage_error
        return LimitStoreError(
            f"the limits store {self._shown} failed: {type(cause).__name__}: "
            f"{redact_uri(str(cause))}"
        )


def rate_limit_headers(state: LimitState, now: float | None = None) -> dict[str, str]:
    """``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset`` (whole seconds until
    reset, IETF draft) and, when refused, ``Retry-After`` (whole seconds, at least 1)."""
    now = time.time() if now is None else now
    headers = {
        "RateLimit-Limit": str(state.limit),
        "RateLimit-Remaining": str(state.remaining),
        "RateLimit-Reset": str(max(0, math.ceil(state.reset_at - now))),
    }
    if not state.allowed:
        headers["Retry-After"] = str(max(1, math.ceil(state.retry_after)))
    return headers
