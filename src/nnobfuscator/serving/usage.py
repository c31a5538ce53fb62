"""Requests (and text-generation tokens) per API key, tier and UTC day, metered in the key store
(never in metric labels).

:meth:`UsageMeter.record` is cheap (a counter in memory under a lock) so the server calls it on
every answered request, and :meth:`UsageMeter.record_tokens` once a completion ends (prompt plus
completion tokens); :meth:`UsageMeter.flush` writes the counts and each key's last use.
Two stores:

* :class:`SqliteUsage`: the table ``key_usage(day, key_id, tier, requests, tokens)`` in the keys
  SQLite file (``requests = requests + ?`` upserts), and ``api_keys.last_used_at``;
* :class:`RedisUsage`: a hash per day ``nnobf:usage:<YYYY-MM-DD>`` with fields
  ``<key_id>:<tier>`` (``HINCRBY``, expiring after 400 days), its tokens in
  ``nnobf:usage-tokens:<YYYY-MM-DD>``, and the hash ``nnobf:last_used`` (key id -> ISO time),
  shared by every process and Ray Serve replica.

Server wiring::

    meter = usage_meter(store.path, redis_url)   # redis_url None: the SQLite file
    meter.start_background_flush(interval_s=1.0) # at start-up
    meter.record(record.id, tier)                # per answered request
    meter.stop()                                 # at shutdown: stops the thread, flushes

Counts recorded since the last flush are lost if the process dies (at most ``interval_s``).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from nnobfuscator.serving.key_database import connect, ensure_schema, transaction

log = logging.getLogger(__name__)

REDIS_PREFIX = "nnobf:usage:"
REDIS_TOKENS_PREFIX = "nnobf:usage-tokens:"
REDIS_LAST_USED = "nnobf:last_used"
REDIS_TTL_DAYS = 400

_USAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_usage (
    day TEXT NOT NULL,
    key_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    requests INTEGER NOT NULL,
    tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id, tier)
)
"""


@dataclass(frozen=True)
class UsageRow:
    """Requests of one key at one tier on one UTC day (``YYYY-MM-DD``), and the prompt plus
    completion tokens of its text-generation requests."""

    day: str
    key_id: str
    tier: str
    requests: int
    tokens: int = 0


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _day(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).date().isoformat()


class UsageMeter:
    """Counts requests in memory; subclasses write them to a store in :meth:`_write`.

    Args:
        clock: the current time (timezone-aware), for ``record`` without ``when`` and for the
            window of :meth:`rows`; tests inject one.
    """

    def __init__(self, *, clock: Callable[[], datetime] | None = None) -> None:
        self.clock = clock or _utcnow
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._tokens: Counter[tuple[str, str, str]] = Counter()
        self._last_used: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- metering ----------------------------------------------------------------------------
    def record(self, key_id: str, tier: str, when: datetime | None = None) -> None:
        """Count one request of ``key_id`` at ``tier`` (in memory until :meth:`flush`)."""
        when = when or self.clock()
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        stamp = when.astimezone(UTC).isoformat(timespec="seconds")
        with self._lock:
            self._counts[(_day(when), key_id, tier)] += 1
            if stamp > self._last_used.get(key_id, ""):
                self._last_used[key_id] = stamp

    def record_tokens(
        self, key_id: str, tier: str, tokens: int, when: datetime | None = None
    ) -> None:
        """Count ``tokens`` (prompt plus completion) of ``key_id`` at ``tier`` (in memory until
        :meth:`flush`); the request itself was counted by :meth:`record`."""
        if tokens <= 0:
            return
        when = when or self.clock()
        with self._lock:
            self._tokens[(_day(when), key_id, tier)] += int(tokens)

    def pending(self) -> int:
        """Requests recorded and not flushed yet."""
        with self._lock:
            return sum(self._counts.values())

    def flush(self) -> None:
        """Write the buffered counts and last-use times; on failure they stay buffered."""
        with self._flush_lock:
            with self._lock:
                counts, self._counts = self._counts, Counter()
                tokens, self._tokens = self._tokens, Counter()
                last_used, self._last_used = self._last_used, {}
            if not counts and not tokens and not last_used:
                return
            try:
                self._write(counts, tokens, last_used)
            except BaseException:
                with self._lock:
                    self._counts.update(counts)
                    self._tokens.update(tokens)
                    for key_id, stamp in last_used.items():
                        if stamp > self._last_used.get(key_id, ""):
                            self._last_used[key_id] = stamp
                raise

    # --- reading -----------------------------------------------------------------------------
    def rows(self, key_id: str | None = None, days: int = 7) -> list[UsageRow]:
        """Stored rows of the last ``days`` UTC days (today included), by day, key and tier.

        Counts not flushed yet are not included: call :meth:`flush` first to see them.
        """
        days_list = self.window(days)
        rows = [r for r in self._read(days_list, key_id) if r.requests or r.tokens]
        return sorted(rows, key=lambda r: (r.day, r.key_id, r.tier))

    def last_used(self) -> dict[str, str]:
        """Key id -> ISO time of its last flushed request."""
        raise NotImplementedError

    def window(self, days: int) -> list[str]:
        """The last ``days`` UTC days as ``YYYY-MM-DD``, today first."""
        today: date = self.clock().astimezone(UTC).date()
        return [(today - timedelta(days=n)).isoformat() for n in range(max(int(days), 1))]

    # --- background flush --------------------------------------------------------------------
    def start_background_flush(self, interval_s: float = 1.0) -> None:
        """Flush every ``interval_s`` seconds in a daemon thread until :meth:`stop`."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.flush()
                except Exception as err:  # keep metering; the counts stay buffered
                    log.warning("usage flush failed (will retry): %s", type(err).__name__)

        self._thread = threading.Thread(target=loop, name="nnobf-usage-flush", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background flush (if any) and flush what is buffered."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()

    def close(self) -> None:
        """:meth:`stop`, then release the store's connections."""
        try:
            self.stop()
        finally:
            self._close()

    def __enter__(self) -> UsageMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- store -------------------------------------------------------------------------------
    def _write(
        self,
        counts: Counter[tuple[str, str, str]],
        tokens: Counter[tuple[str, str, str]],
        last_used: dict[str, str],
    ) -> None:
        raise NotImplementedError

    def _read(self, days: list[str], key_id: str | None) -> list[UsageRow]:
        raise NotImplementedError

    def _close(self) -> None:
        pass


class SqliteUsage(UsageMeter):
    """Usage in the keys SQLite file: table ``key_usage`` and ``api_keys.last_used_at``."""

    def __init__(self, path: str | Path, *, clock: Callable[[], datetime] | None = None) -> None:
        super().__init__(clock=clock)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(connect(self.path)) as db, transaction(db):
            ensure_schema(db)
            db.execute(_USAGE_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(key_usage)")}
            if "tokens" not in columns:  # a keys file from before token metering
                db.execute("ALTER TABLE key_usage ADD COLUMN tokens INTEGER NOT NULL DEFAULT 0")

    def _write(
        self,
        counts: Counter[tuple[str, str, str]],
        tokens: Counter[tuple[str, str, str]],
        last_used: dict[str, str],
    ) -> None:
        with closing(connect(self.path)) as db, transaction(db):
            db.executemany(
                "INSERT INTO key_usage (day, key_id, tier, requests, tokens) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (day, key_id, tier) DO UPDATE SET "
                "requests = requests + excluded.requests, tokens = tokens + excluded.tokens",
                [(*key, counts[key], tokens[key]) for key in {*counts, *tokens}],
            )
            db.executemany(
                "UPDATE api_keys SET last_used_at = ? "
                "WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)",
                [(stamp, key_id, stamp) for key_id, stamp in last_used.items()],
            )

    def _read(self, days: list[str], key_id: str | None) -> list[UsageRow]:
        sql = (
            "SELECT day, key_id, tier, requests, tokens FROM key_usage WHERE day >= ? AND day <= ?"
        )
        args: list[Any] = [min(days), max(days)]
        if key_id is not None:
            sql += " AND key_id = ?"
            args.append(key_id)
        with closing(connect(self.path)) as db:
            return [UsageRow(*row) for row in db.execute(sql, args)]

    def last_used(self) -> dict[str, str]:
        with closing(connect(self.path)) as db:
            rows = db.execute("SELECT id, last_used_at FROM api_keys WHERE last_used_at NOT NULL")
            return dict(rows.fetchall())


class RedisUsage(UsageMeter):
    """Usage in Redis: ``HINCRBY nnobf:usage:<day> <key_id>:<tier> n`` and ``nnobf:last_used``.

    Raises:
        ImportError: the ``redis`` package is missing (``pip install 'nnobfuscator[serve]'``).
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], datetime] | None = None,
        ttl_days: int = REDIS_TTL_DAYS,
    ) -> None:
        super().__init__(clock=clock)
        import redis

        self.ttl_s = int(ttl_days * 86400)
        self._client = redis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=5, decode_responses=True
        )

    def _write(
        self,
        counts: Counter[tuple[str, str, str]],
        tokens: Counter[tuple[str, str, str]],
        last_used: dict[str, str],
    ) -> None:
        # MULTI/EXEC: a flush that fails applies nothing, so its retry cannot count twice
        pipe = self._client.pipeline(transaction=True)
        for prefix, counter in ((REDIS_PREFIX, counts), (REDIS_TOKENS_PREFIX, tokens)):
            for (day, key_id, tier), n in counter.items():
                pipe.hincrby(f"{prefix}{day}", f"{key_id}:{tier}", n)
            for day in {day for day, _, _ in counter}:
                pipe.expire(f"{prefix}{day}", self.ttl_s)
        if last_used:
            # Several processes write here; ISO times of one clock order as strings, so a
            # slightly older stamp arriving late may win (good enough for "last used").
            pipe.hset(REDIS_LAST_USED, mapping=last_used)
        pipe.execute()

    def _read(self, days: list[str], key_id: str | None) -> list[UsageRow]:
        pipe = self._client.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(f"{REDIS_PREFIX}{day}")
            pipe.hgetall(f"{REDIS_TOKENS_PREFIX}{day}")
        answers = pipe.execute()
        rows = []
        for day, requests, tokens in zip(days, answers[::2], answers[1::2], strict=True):
            for field in {*requests, *tokens}:
                owner, _, tier = field.partition(":")
                if key_id is None or owner == key_id:
                    count, used = int(requests.get(field, 0)), int(tokens.get(field, 0))
                    rows.append(UsageRow(day, owner, tier, count, used))
        return rows

    def last_used(self) -> dict[str, str]:
        return dict(self._client.hgetall(REDIS_LAST_USED))

    def _close(self) -> None:
        self._client.close()


def usage_meter(
    keys_path: str | Path,
    redis_url: str | None = None,
    *,
    clock: Callable[[], datetime] | None = None,
) -> UsageMeter:
    """:class:`RedisUsage` when ``redis_url`` is given, else :class:`SqliteUsage` in the keys
    file."""
    if redis_url:
        return RedisUsage(redis_url, clock=clock)
    return SqliteUsage(keys_path, clock=clock)


__all__ = ["RedisUsage", "SqliteUsage", "UsageMeter", "UsageRow", "usage_meter"]
