"""Per-key token buckets; a key's tier sets its bucket's size and refill rate.

The server counts with :class:`nnobfuscator.serving.limiter.LimitStore` (rates, quotas, shared
through Redis across replicas); these in-process buckets stay for code that still imports them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from nnobfuscator.serving.config import RateLimit


class RateLimiter:
    """Token buckets keyed by key id (in memory, per server process).

    A bucket holds up to ``limit.requests`` tokens and refills at ``limit.per_second``; each
    request takes one. When a key changes tier its bucket follows the new tier's limit.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last time)
        self._lock = threading.Lock()

    def acquire(self, key_id: str, limit: RateLimit | None) -> float | None:
        """Take a token for ``key_id``; returns ``None`` if allowed, else seconds to wait."""
        if limit is None:
            return None
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (limit.requests, now))
            tokens = min(limit.requests, tokens + (now - last) * limit.per_second)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return None
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / limit.per_second


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` takes whole seconds: round up, at least 1."""
    return str(max(1, math.ceil(seconds)))
