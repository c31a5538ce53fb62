"""Who is calling and at which tier: API key -> the key's tier -> the policy's served tier.

The key is checked against the store on every request (so tier changes, expiry and revocation
apply at once); the serving policy (:mod:`nnobfuscator.serving.policy_engine`) then picks the tier
the request is served at, or refuses it (429).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from nnobfuscator.serving.api_keys import ApiKey, KeyStore, KeyStoreError
from nnobfuscator.serving.errors import ApiError
from nnobfuscator.serving.metrics import Metrics
from nnobfuscator.serving.policy_engine import Caller, Decision, PolicyEngine, TokenReservation
from nnobfuscator.serving.usage import UsageMeter

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="nnobfuscator"'}
TIER_REQUEST_HEADER = "X-Request-Tier"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the key's record, the tier this request runs at and the
    policy's decision (reasons and headers)."""

    key: ApiKey
    tier: str
    decision: Decision | None = field(default=None, compare=False)

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.decision.headers) if self.decision is not None else {}

    @property
    def owner(self) -> bool:
        return self.key.owner


def presented_key(request: Request) -> str | None:
    """The key from ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    value = request.headers.get("x-api-key")
    return value.strip() if value and value.strip() else None


class Authenticator:
    """Resolves a request's key to a :class:`Principal`, or refuses it (401, 403, 429).

    Args:
        store: the key store (read on every request, so tier changes and revocations apply at
            once).
        tiers: the served model's tier names, lowest first.
        engine: the serving policy (limits, quotas, schedules, brownout).
        metrics: where refusals and downgrades are counted.
        usage: meters each admitted request per key, tier and day (``record(key_id, tier)``).
    """

    def __init__(
        self,
        store: KeyStore,
        tiers: list[str],
        engine: PolicyEngine,
        metrics: Metrics,
        usage: UsageMeter | None = None,
    ) -> None:
        self.store = store
        self.tiers = tiers
        self.engine = engine
        self.metrics = metrics
        self.usage = usage

    async def __call__(self, request: Request) -> Principal:
        """An inference request: the key, then the policy (counts against limits and quotas,
        metered as usage)."""
        return self._resolve(request, consume=True)

    async def identify(self, request: Request) -> Principal:
        """Any other request (key info, owner views): the key, and the tier the policy would
        serve it at now, without counting it against limits, quotas or usage."""
        return self._resolve(request, consume=False)

    def _resolve(self, request: Request, consume: bool) -> Principal:
        # run on the event loop on purpose: one indexed SQLite read, cheaper than a thread hop
        token = presented_key(request)
        if token is None:
            self._refuse(
                "missing", "no API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            )
        record = self.store.verify(token)
        if record is None:
            self._refuse("invalid", "the API key is not valid; check it or ask for a new one")
        refusal = record.refusal(self.store.now())
        if refusal is not None:
            self._refuse(*refusal)
        asked = self._tier(record, request.headers.get(TIER_REQUEST_HEADER) or None)
        holder = self._successor(record)  # a rotated key counts and is ruled as its replacement
        caller = Caller(holder.id, holder.name, record.tier or self.tiers[-1], asked, record.owner)
        if not consume:
            decision = self.engine.decide(caller, consume=False)
            return Principal(record, decision.tier, decision)
        try:
            decision = self.engine.decide(caller)
        except ApiError as err:
            self.metrics.rate_limited.labels(caller.key_tier).inc()
            raise err
        if decision.downgraded:
            for reason in decision.reasons:
                self.metrics.downgrades.labels(decision.key_tier, reason).inc()
        request.state.tier = decision.tier
        if self.usage is not None:
            self.usage.record(record.id, decision.tier)
        return Principal(record, decision.tier, decision)

    def reserve_tokens(
        self, principal: Principal, prompt: int, completion: int
    ) -> TokenReservation | None:
        """Charge a text-generation request's prompt and ``max_tokens`` to its key's token
        quota (a rotated key's to its replacement's), or refuse it (429); see
        :meth:`PolicyEngine.reserve_tokens`."""
        holder = self._successor(principal.key)
        key_tier = principal.decision.key_tier if principal.decision else principal.tier
        caller = Caller(holder.id, holder.name, key_tier, principal.tier, principal.owner)
        try:
            return self.engine.reserve_tokens(caller, prompt, completion)
        except ApiError:
            self.metrics.rate_limited.labels(key_tier).inc()
            raise

    def _successor(self, record: ApiKey) -> ApiKey:
        """The newest key of ``record``'s rotations (itself when never rotated): during a grace
        period the old and new key share one set of limits and the per-key rules by name."""
        current, hops = record, 0
        while current.replaced_by is not None and hops < 16:
            try:
                current = self.store.get(current.replaced_by)
            except KeyStoreError:
                break
            hops += 1
        return current

    def _tier(self, record: ApiKey, requested: str | None) -> str:
        own = record.tier or self.tiers[-1]
        if own not in self.tiers:
            raise ApiError(
                403,
                "unknown_tier",
                f"this key's tier {own!r} is not offered by the served model (tiers: "
                f"{', '.join(self.tiers)}); move it with `nnobf keys set-tier KEY TIER`",
            )
        if requested is None or requested == own:
            return own
        if requested not in self.tiers:
            raise ApiError(
                400,
                "unknown_tier",
                f"{TIER_REQUEST_HEADER}: {requested!r} is not a tier of this model "
                f"(tiers: {', '.join(self.tiers)})",
            )
        if not record.owner and self.tiers.index(requested) > self.tiers.index(own):
            raise ApiError(
                403,
                "tier_not_allowed",
                f"this key unlocks tier {own!r}; it may request that tier or a lower one, "
                f"not {requested!r}",
            )
        return requested

    def _refuse(self, reason: str, detail: str) -> None:
        reason = reason.removesuffix("_key")
        self.metrics.auth_failures.labels(reason).inc()
        raise ApiError(401, f"{reason}_key", detail, _CHALLENGE)

    def require_owner(self, principal: Principal, what: str = "comparing tiers") -> None:
        if not principal.owner:
            raise ApiError(
                403, "owner_only", f"{what} needs an owner key (`nnobf keys create --owner`)"
            )
