"""Evaluates the serving policy for each request: the tier it is served at, and why.

One :class:`PolicyEngine` per server process; its limits and quotas live in a
:class:`~nnobfuscator.serving.limiter.LimitStore` (in memory, or Redis shared by replicas). A new
policy replaces the old one atomically (:meth:`PolicyEngine.reload`); a bad one never gets that
far (:func:`~nnobfuscator.serving.policy.load_policy` refuses it).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nnobfuscator.serving.errors import ApiError
from nnobfuscator.serving.history import History
from nnobfuscator.serving.limiter import (
    Kind,
    Limit,
    LimitState,
    LimitStore,
    parse_limit,
    rate_limit_headers,
)
from nnobfuscator.serving.load_signals import BrownoutSwitch, LoadMonitor
from nnobfuscator.serving.policy import Downgrade, Policy, utc_now

KEY_TIER_HEADER = "X-Key-Tier"
REASON_HEADER = "X-Tier-Reason"


@dataclass(frozen=True)
class Decision:
    """Where a request runs: the served ``tier``, the key's own tier, the reasons they differ
    (``schedule``, ``quota``, ``load``), the headers its answer carries, and whether the served
    tier is below the key's (a scheduled upgrade is not a downgrade)."""

    tier: str
    key_tier: str
    reasons: tuple[str, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    downgraded: bool = False


@dataclass(frozen=True)
class Caller:
    """Who asks: the key's id (and name, for per-key rules), its own tier, the tier it asks
    for (its own or lower) and whether it is an owner key (owner keys bypass the policy)."""

    key_id: str
    key_name: str | None
    key_tier: str
    asked: str
    owner: bool = False


@dataclass(frozen=True)
class TokenReservation:
    """Tokens a text-generation request may use, counted against its key's token quota at
    ``at`` (epoch seconds); :meth:`PolicyEngine.settle_tokens` gives back what it did not use.
    ``headers``: where the key stands (``X-Token-Quota-Limit``, ``X-Token-Quota-Remaining``)."""

    key_id: str
    limit: Limit
    tokens: int
    at: float
    headers: dict[str, str] = field(default_factory=dict)


class PolicyEngine:
    """Applies a :class:`Policy` to each request.

    Args:
        policy: the policy in force.
        limits: where rate limits and quotas count.
        load: the process's load signals (brownout).
        clock: the current UTC time (schedules; injectable for tests).
    """

    def __init__(
        self,
        policy: Policy,
        limits: LimitStore,
        load: LoadMonitor,
        clock: Callable[[], datetime] = utc_now,
        history: History | None = None,
    ) -> None:
        self.limits, self.load, self.clock = limits, load, clock
        self.brownout = BrownoutSwitch()
        self.history = history or History()
        self._lock = threading.Lock()
        self.reload(policy)

    @property
    def policy(self) -> Policy:
        return self._policy

    def reload(self, policy: Policy) -> None:
        """Put ``policy`` in force from the next request on (counts already made are kept)."""
        with self._lock:
            self._policy = policy
            if policy.spec.brownout is None:
                self.brownout.reset()
            else:
                self.load.window_s = policy.spec.brownout.window_s

    def browned_out(self) -> bool:
        """Whether brownout is on now (updates the switch from the current signal)."""
        spec = self._policy.spec.brownout
        if spec is None:
            return False
        value = self.load.signals()[spec.signal]
        return self.brownout.update(value, spec.above, spec.below, spec.hold_s)

    def decide(self, caller: Caller, consume: bool = True) -> Decision:
        """The tier ``caller``'s request is served at.

        Args:
            consume: count the request against the key's limits and quotas (an inference
                request); ``False`` previews the decision (key info, owner views) and never
                raises.

        Raises:
            ApiError: 429 when the key's rate limit, or a quota whose ``on_exhausted`` is
                ``reject``, is used up (with ``Retry-After`` and the rate-limit headers).
        """
        policy = self._policy
        count = self.limits.hit if consume else self.limits.peek
        if caller.owner:
            return Decision(caller.asked, caller.key_tier, (), {KEY_TIER_HEADER: caller.key_tier})
        tier, reasons = caller.asked, []
        scheduled = policy.scheduled(tier, self.clock())
        if scheduled is not None and scheduled != tier:
            tier = scheduled
            reasons.append("schedule")
        refs = tuple(r for r in (caller.key_name, caller.key_id) if r)
        rule = policy.rule(caller.key_tier, refs)
        headers: dict[str, str] = {}
        if rule.rate is not None:
            state = count("rate", caller.key_id, _limit(rule.rate, "rate"))
            headers.update(rate_limit_headers(state))
            if not state.allowed and consume:
                raise self._refused(
                    caller,
                    "rate",
                    f"rate limit of tier {caller.key_tier!r} reached",
                    rule.rate,
                    state,
                    headers,
                )
        if rule.quota is not None:
            quota = count("quota", caller.key_id, _limit(rule.quota, "quota"))
            headers.update(_quota_headers(quota, rule.quota))
            if not headers.get("RateLimit-Limit"):
                headers.update(rate_limit_headers(quota))
            if not quota.allowed:
                exhausted = rule.on_exhausted
                lower = (
                    isinstance(exhausted, Downgrade)
                    and exhausted.downgrade in policy.tiers
                    and policy.rank(exhausted.downgrade) < policy.rank(tier)
                )
                if lower:
                    tier = exhausted.downgrade  # type: ignore[union-attr]
                    reasons.append("quota")
                elif consume:  # reject, or a "downgrade" that would not serve lower
                    raise self._refused(
                        caller,
                        "quota",
                        f"quota of tier {caller.key_tier!r} used up",
                        rule.quota,
                        quota,
                        headers,
                    )
        brownout = policy.spec.brownout
        if brownout is not None and tier in brownout.serve and self.browned_out():
            lowered = brownout.serve[tier]
            if lowered != tier:
                tier = lowered
                reasons.append("load")
        headers[KEY_TIER_HEADER] = caller.key_tier
        if reasons:
            headers[REASON_HEADER] = ",".join(reasons)
        downgraded = policy.rank(tier) < policy.rank(caller.key_tier)
        if consume:  # the history's "moved" columns count downgrades only
            self.history.record(tier, caller.key_tier, tuple(reasons) if downgraded else ())
        return Decision(tier, caller.key_tier, tuple(reasons), headers, downgraded)

    def reserve_tokens(
        self, caller: Caller, prompt: int, completion: int
    ) -> TokenReservation | None:
        """Count a text-generation request's ``prompt`` tokens plus the ``completion`` tokens it
        may make against the key's ``token_quota``; ``None`` when its rule has none (and for
        owner keys).

        Raises:
            ApiError: 429 when they do not fit in what is left of the quota (with
                ``Retry-After``), and also when they exceed the whole quota (naming how many
                tokens would fit).
        """
        if caller.owner:
            return None
        refs = tuple(r for r in (caller.key_name, caller.key_id) if r)
        text = self._policy.rule(caller.key_tier, refs).token_quota
        if text is None:
            return None
        limit, tokens, at = _limit(text, "quota"), prompt + completion, time.time()
        what = f"{tokens} tokens (prompt {prompt} + max_tokens {completion})"
        if tokens > limit.amount:
            raise ApiError(
                429,
                "token_quota_exceeded",
                f"this request may use {what}, more than the whole token quota of tier "
                f"{caller.key_tier!r} ({text} per key): lower max_tokens or shorten the prompt",
            )
        state = self.limits.hit("tokens", caller.key_id, limit, tokens, at=at)
        headers = {"X-Token-Quota-Limit": text, "X-Token-Quota-Remaining": str(state.remaining)}
        if not state.allowed:
            self.history.record(caller.key_tier, None, ("quota",))
            wait = max(1.0, state.retry_after)
            raise ApiError(
                429,
                "token_quota_exhausted",
                f"token quota of tier {caller.key_tier!r} used up ({text} per key): "
                f"{state.remaining} tokens left and this request may use {what}; lower "
                f"max_tokens, or retry after {wait:.0f} s",
                {**headers, **rate_limit_headers(state)},
            )
        return TokenReservation(caller.key_id, limit, tokens, at, headers)

    def settle_tokens(self, reservation: TokenReservation | None, used: int) -> None:
        """Give back the tokens ``reservation`` holds beyond the ``used`` ones."""
        if reservation is not None and used < reservation.tokens:
            self.limits.refund(
                "tokens",
                reservation.key_id,
                reservation.limit,
                reservation.tokens - used,
                reservation.at,
            )

    def _refused(
        self,
        caller: Caller,
        reason: str,
        what: str,
        limit: str,
        state: LimitState,
        headers: dict[str, str],
    ) -> ApiError:
        """A 429 for ``reason`` (``rate`` or ``quota``), counted in the history."""
        self.history.record(caller.key_tier, None, (reason,))
        wait = max(1.0, state.retry_after)
        return ApiError(
            429,
            {"rate": "rate_limited", "quota": "quota_exhausted"}[reason],
            f"{what} ({limit} per key); retry after {wait:.0f} s",
            {**headers, **rate_limit_headers(state)},
        )

    def status(self) -> dict[str, Any]:
        """The policy in force, schedules active now and the brownout state (JSON-ready)."""
        policy = self._policy
        now = self.clock()
        spec = policy.spec
        state = self.brownout.state
        return {
            "source": policy.source,
            "policy": policy.describe(),
            "schedules_in_force": [s.name for s in spec.schedules if s.covers(now)],
            "brownout": None
            if spec.brownout is None
            else {
                "active": self.browned_out(),
                "signal": spec.brownout.signal,
                "value": round(state.value, 3),
                "above": spec.brownout.above,
                "below": spec.brownout.below,
                "hold_s": spec.brownout.hold_s,
                "since": state.since,
                "changes": state.changes,
            },
            "signals": {k: round(v, 3) for k, v in self.load.signals().items()},
            "priority": spec.priority,
        }


@functools.lru_cache(maxsize=256)
def _limit(text: str, kind: Kind) -> Limit:
    """A policy's limit text, parsed once (decisions run on every request)."""
    return parse_limit(text, kind)


def _quota_headers(state: LimitState, text: str) -> dict[str, str]:
    return {"X-Quota-Limit": text, "X-Quota-Remaining": str(max(0, state.remaining))}
