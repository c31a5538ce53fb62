"""Load signals of a serving process and the brownout switch they drive.

The batcher reports each request's queue wait and each forward's duration; the signals are
the 95th percentile of those over the last ``window_s`` seconds, and the queue depth now.
Brownout turns on when the chosen signal exceeds ``above`` and off only once it has stayed at
``below`` or under for ``hold_s`` seconds (hysteresis and a hold: no flapping around one
threshold, nor on a queue that drains for a moment under a load that has not gone).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile of ``values`` (nearest rank; 0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


class LoadMonitor:
    """Recent queue waits and forward times, in milliseconds.

    Args:
        window_s: seconds of history kept.
        depth: returns the number of requests waiting now.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        window_s: float = 10.0,
        depth: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s, self._depth, self._clock = window_s, depth, clock
        self._waits: deque[tuple[float, float]] = deque()
        self._batches: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def record_wait(self, seconds: float) -> None:
        self._add(self._waits, seconds)

    def record_batch(self, seconds: float) -> None:
        self._add(self._batches, seconds)

    def _add(self, samples: deque[tuple[float, float]], seconds: float) -> None:
        now = self._clock()
        with self._lock:
            samples.append((now, 1000.0 * seconds))
            self._trim(samples, now)

    def _trim(self, samples: deque[tuple[float, float]], now: float) -> None:
        while samples and samples[0][0] < now - self.window_s:
            samples.popleft()

    def _recent(self, samples: deque[tuple[float, float]]) -> list[float]:
        now = self._clock()
        with self._lock:
            self._trim(samples, now)
            return [value for _, value in samples]

    def signals(self) -> dict[str, float]:
        """``queue_wait_p95_ms``, ``batch_p95_ms`` and ``queue_depth`` now."""
        return {
            "queue_wait_p95_ms": percentile(self._recent(self._waits), 0.95),
            "batch_p95_ms": percentile(self._recent(self._batches), 0.95),
            "queue_depth": float(self._depth()),
        }


@dataclass
class BrownoutState:
    """Whether brownout is on, since when (UTC epoch seconds) and the signal's last value."""

    active: bool = False
    since: float | None = None
    value: float = 0.0
    changes: int = 0


class BrownoutSwitch:
    """Hysteresis on one load signal: on above ``above``, off once it has stayed at or below
    ``below`` for ``hold_s`` seconds.

    Args:
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.state = BrownoutState()
        self._clock = clock
        self._calm_since: float | None = None
        self._lock = threading.Lock()

    def update(self, value: float, above: float, below: float, hold_s: float = 0.0) -> bool:
        """Feed the signal's current value; returns whether brownout is on."""
        with self._lock:
            state, now = self.state, self._clock()
            state.value = value
            if value > below:
                self._calm_since = None
            elif self._calm_since is None:
                self._calm_since = now
            if not state.active and value > above:
                state.active, state.since, state.changes = True, time.time(), state.changes + 1
            elif state.active and self._calm_since is not None and now - self._calm_since >= hold_s:
                state.active, state.since, state.changes = False, time.time(), state.changes + 1
            return state.active

    def reset(self) -> None:
        with self._lock:
            self.state, self._calm_since = BrownoutState(), None
