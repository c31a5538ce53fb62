"""Requests and downgrades per tier per minute, for the owner page (this process, last hours)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class History:
    """Per-minute counters of served requests, downgrades and refusals, by tier.

    Args:
        minutes: how many minutes are kept (older ones drop off).
        clock: epoch seconds (injectable for tests).
    """

    def __init__(self, minutes: int = 6 * 60, clock: Callable[[], float] = time.time) -> None:
        self.minutes, self._clock = minutes, clock
        self._buckets: OrderedDict[int, dict[str, dict[str, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, served: str, key_tier: str | None, reasons: tuple[str, ...]) -> None:
        """One request: ``served`` is the tier it ran at (``key_tier`` ``None``: refused with
        ``reasons[0]``); it counts as downgraded when any reason changed its tier."""
        minute = int(self._clock() // 60)
        with self._lock:
            bucket = self._buckets.setdefault(minute, {})
            counts = bucket.setdefault(served, {})
            if key_tier is None:
                name = f"refused_{reasons[0]}" if reasons else "refused"
                counts[name] = counts.get(name, 0) + 1
            else:
                counts["requests"] = counts.get("requests", 0) + 1
                for reason in reasons:
                    counts[reason] = counts.get(reason, 0) + 1
            while self._buckets and next(iter(self._buckets)) <= minute - self.minutes:
                self._buckets.popitem(last=False)

    def series(self, minutes: int = 180) -> dict[str, Any]:
        """The last ``minutes`` minutes: ``{"start": epoch s, "step_s": 60, "tiers": {tier:
        {counter: [one value per minute]}}}`` (zeros where nothing happened)."""
        now = int(self._clock() // 60)
        span = list(range(now - minutes + 1, now + 1))
        with self._lock:
            snapshot = {m: {t: dict(c) for t, c in self._buckets.get(m, {}).items()} for m in span}
        tiers: dict[str, dict[str, list[int]]] = {}
        for index, minute in enumerate(span):
            for tier, counts in snapshot[minute].items():
                row = tiers.setdefault(tier, {})
                for name, value in counts.items():
                    row.setdefault(name, [0] * len(span))[index] = value
        return {"start": span[0] * 60, "step_s": 60, "tiers": tiers}
