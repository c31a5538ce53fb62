"""Server settings: batching, input limits, per-tier rate limits and token quotas."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_PERIODS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class RateLimit:
    """``requests`` per ``period`` seconds, with bursts up to ``requests``."""

    requests: float
    period: float

    @property
    def per_second(self) -> float:
        return self.requests / self.period

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "min", 3600.0: "h"}.get(self.period, f"{self.period:g}s")
        return f"{self.requests:g}/{unit}"


def parse_rate(text: str) -> RateLimit | None:
    """``"60/min"`` -> ``RateLimit(60, 60.0)``; ``"none"`` -> ``None`` (unlimited)."""
    if text.strip().lower() in {"none", "unlimited", "off"}:
        return None
    match = _RATE.match(text.lower())
    if not match or match.group(2) not in _PERIODS or float(match.group(1)) <= 0:
        raise ValueError(
            f"invalid rate limit {text!r}: write COUNT/PERIOD with PERIOD s, min or h "
            "(e.g. '60/min'), or 'none'"
        )
    return RateLimit(float(match.group(1)), _PERIODS[match.group(2)])


def parse_rate_limits(spec: str) -> dict[str, RateLimit | None]:
    """``"free=60/min,pro=600/min,*=none"`` -> a per-tier mapping (``*`` is every other tier)."""
    limits: dict[str, RateLimit | None] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        tier, sep, rate = item.partition("=")
        if not sep or not tier.strip():
            raise ValueError(f"invalid rate limit item {item!r}: write TIER=COUNT/PERIOD")
        limits[tier.strip()] = parse_rate(rate)
    return limits


STORE_SCHEMES = ("memory", "redis", "rediss")
_STORE_FORMS = "memory:// (this process only) or redis://[:password@]host:port[/db] (shared)"


def check_store_uri(uri: str) -> str:
    """Check a limits store URI (``memory://`` or ``redis://host:port[/db]``) and return it.

    Raises:
        ValueError: naming the URI (without its password) and the accepted forms.
    """
    text = uri.strip()
    try:
        parts = urlsplit(text)
        port, db = parts.port, parts.path.strip("/")
    except ValueError as err:  # a port that is not a number
        raise ValueError(
            f"invalid limits store {redact_uri(text)!r}: {err}; use {_STORE_FORMS}"
        ) from None
    if parts.scheme not in STORE_SCHEMES:
        raise ValueError(f"invalid limits store {redact_uri(text)!r}: use {_STORE_FORMS}")
    if parts.scheme == "memory":
        if parts.netloc or db:
            raise ValueError(f"invalid limits store {text!r}: write just 'memory://'")
        return "memory://"
    if "password" in parts.query.lower():
        raise ValueError(
            f"invalid limits store {redact_uri(text.split('?')[0])!r}: put the password in the "
            "address, redis://:PASSWORD@host:port/db (it is then kept out of every message)"
        )
    if not parts.hostname or (db and not db.isdigit()) or (port is not None and port < 1):
        raise ValueError(
            f"invalid limits store {redact_uri(text)!r}: write {parts.scheme}://host:port[/db] "
            "with a host name, an optional port and an optional database number"
        )
    return text


def redact_uri(uri: str) -> str:
    """``uri`` with its password, if any, replaced by ``***`` (safe for messages and logs)."""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return uri.split("@", 1)[-1] if "@" in uri else uri
    if not password:
        return uri
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


@dataclass
class ServeConfig:
    """How the server batches, what input it accepts and how often each key may call.

    Args:
        max_batch_size: most requests run in one forward pass.
        max_wait_ms: how long the first request of a batch waits for company.
        max_body_bytes: larger request bodies get 413.
        max_image_side: images with a longer side (in pixels) get 422.
        max_prompt_chars: longer prompts get 422.
        rate_limits: per-tier limits (``"*"`` for tiers not named; ``None`` = unlimited).
            Owner keys are not rate limited.
        default_top_k: how many classes ``/v1/classify`` returns unless asked.
        limits_store: where rate limits, quotas and usage are counted: ``"memory://"`` (each
            process or Ray Serve replica counts on its own) or ``"redis://host:port[/db]"``
            (one count shared by every process and replica).
        preempt_ms: under load, a cheap tier's batch larger than ``max_batch_size`` runs in
            chunks of about this long, and a request of a higher tier (policy ``priority``)
            waits for one chunk rather than the whole batch; ``None`` runs batches whole.
        token_quotas: per-tier quotas of prompt plus completion tokens per key (text
            generation), e.g. ``{"free": "20000/day", "*": None}``; a policy file's
            ``token_quota`` rules replace them.
        max_tokens: the most completion tokens one request may ask for (``max_tokens``).
        default_max_tokens: completion tokens when a request does not say.
        max_prompt_tokens: the longest prompt in tokens; ``None``: what the model's context
            leaves after the request's ``max_tokens``.
        generation_wait_ms: how long the first completion request waits for others to join
            its ``generate`` call (up to ``max_batch_size`` requests).
    """

    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    max_body_bytes: int = 8 * 1024 * 1024
    max_image_side: int = 4096
    max_prompt_chars: int = 1000
    rate_limits: dict[str, RateLimit | None] = field(
        default_factory=lambda: {"*": RateLimit(600, 60.0)}
    )
    default_top_k: int = 5
    limits_store: str = "memory://"
    preempt_ms: float | None = 25.0
    token_quotas: dict[str, str | None] = field(default_factory=dict)
    max_tokens: int = 512
    default_max_tokens: int = 64
    max_prompt_tokens: int | None = None
    generation_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        self.limits_store = check_store_uri(self.limits_store)
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        if self.preempt_ms is not None and self.preempt_ms <= 0:
            raise ValueError("preempt_ms must be positive (or None to run batches whole)")
        if not 1 <= self.default_max_tokens <= self.max_tokens:
            raise ValueError("default_max_tokens must be from 1 to max_tokens")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be at least 1 (or None: the model's context)")
        if self.generation_wait_ms < 0:
            raise ValueError("generation_wait_ms must be >= 0")

    def rate_limit(self, tier: str) -> RateLimit | None:
        """The limit for ``tier`` (its own entry, else ``"*"``, else unlimited)."""
        if tier in self.rate_limits:
            return self.rate_limits[tier]
        return self.rate_limits.get("*")
