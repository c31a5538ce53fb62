"""Who is calling and at which tier: API key -> tier, checked against the store on every request."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from nnobfuscator.serving.config import ServeConfig
from nnobfuscator.serving.errors import ApiError
from nnobfuscator.serving.keystore import ApiKey, KeyStore
from nnobfuscator.serving.metrics import Metrics
from nnobfuscator.serving.ratelimit import RateLimiter, retry_after_header

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="nnobfuscator"'}
TIER_REQUEST_HEADER = "X-Request-Tier"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the key's record and the tier this request runs at."""

    key: ApiKey
    tier: str

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
        config: server settings (rate limits).
        metrics: where refusals are counted.
    """

    def __init__(
        self, store: KeyStore, tiers: list[str], config: ServeConfig, metrics: Metrics
    ) -> None:
        self.store = store
        self.tiers = tiers
        self.config = config
        self.metrics = metrics
        self.limiter = RateLimiter()

    async def __call__(self, request: Request) -> Principal:
        # async on purpose: one indexed SQLite read, cheaper than a hop to the thread pool
        token = presented_key(request)
        if token is None:
            self._refuse(
                "missing", "no API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            )
        record = self.store.verify(token)
        if record is None:
            self._refuse("invalid", "the API key is not valid; check it or ask for a new one")
        if record.revoked:
            self._refuse("revoked", "the API key was revoked; ask the model owner for a new one")
        tier = self._tier(record, request.headers.get(TIER_REQUEST_HEADER) or None)
        request.state.tier = tier
        if not record.owner:
            own = record.tier or tier  # a key asking for a lower tier keeps its own limit
            limit = self.config.rate_limit(own)
            wait = self.limiter.acquire(record.id, limit)
            if wait is not None:
                self.metrics.rate_limited.labels(tier).inc()
                raise ApiError(
                    429,
                    "rate_limited",
                    f"rate limit of tier {own!r} reached ({limit} per key); "
                    f"retry after {wait:.1f} s",
                    {"Retry-After": retry_after_header(wait)},
                )
        return Principal(record, tier)

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
        self.metrics.auth_failures.labels(reason).inc()
        raise ApiError(401, f"{reason}_key", detail, _CHALLENGE)

    def require_owner(self, principal: Principal) -> None:
        if not principal.owner:
            raise ApiError(
                403,
                "owner_only",
                "comparing tiers needs an owner key (`nnobf keys create --owner`)",
            )
