"""serving.limiter: limit parsing, rate limits and quotas in memory and shared through Redis."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nnobfuscator.serving.config import RateLimit, ServeConfig
from nnobfuscator.serving.limiter import (
    Limit,
    LimitState,
    LimitStore,
    LimitStoreError,
    limit_from_rate,
    parse_limit,
    parse_optional_limit,
    rate_limit_headers,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("60/min", Limit(60, 1, "minute")),
        ("600/h", Limit(600, 1, "hour")),
        ("10/s", Limit(10, 1, "second")),
        ("1000/day", Limit(1000, 1, "day")),
        ("1000 per day", Limit(1000, 1, "day")),
        ("5/30 seconds", Limit(5, 30, "second")),
        (" 3 per 2 hours ", Limit(3, 2, "hour")),
        ("100/Month", Limit(100, 1, "month")),
    ],
)
def test_parse_limit_forms(text, expected):
    assert parse_limit(text) == expected
    assert parse_limit(text, "quota") == expected.as_kind("quota")
    assert parse_limit(str(expected)) == expected  # str() round-trips


def test_parse_limit_errors_teach():
    for text in ["fast", "0/min", "1.5/s", "10/fortnight", "10/0 seconds", "none"]:
        with pytest.raises(ValueError, match="invalid limit") as err:
            parse_limit(text)
        assert repr(text) in str(err.value) and "'1000 per day'" in str(err.value)
    assert parse_optional_limit("none") is None
    assert parse_optional_limit("Unlimited") is None
    assert parse_optional_limit("2/s") == Limit(2)
    with pytest.raises(ValueError, match="or 'none' for unlimited"):
        parse_optional_limit("lots")
    with pytest.raises(ValueError, match="kind"):
        Limit(1, kind="burst")  # type: ignore[arg-type]
    assert Limit(5, 30).seconds == 30 and parse_limit("1/day").seconds == 86400


def test_limit_from_rate():
    assert limit_from_rate(RateLimit(60, 60.0)) == Limit(60, 1, "minute")
    assert limit_from_rate(RateLimit(2, 1.0), "quota") == Limit(2, 1, "second", "quota")
    assert limit_from_rate(RateLimit(5, 30.0)) == Limit(5, 30, "second")
    assert limit_from_rate(None) is None


def test_memory_rate_limit_allows_exactly_the_limit_then_refuses():
    store, limit = LimitStore(), parse_limit("5/min")
    assert store.peek("rate", "k", limit) == LimitState(
        True, 5, 5, pytest.approx(time.time(), abs=1), 0.0
    )
    states = [store.hit("rate", "k", limit) for _ in range(7)]
    assert [s.allowed for s in states] == [True] * 5 + [False] * 2
    assert [s.remaining for s in states] == [4, 3, 2, 1, 0, 0, 0]
    refused = states[-1]
    assert refused.limit == 5 and 59 < refused.retry_after <= 60
    assert refused.reset_at == pytest.approx(states[0].reset_at, abs=1e-6)  # first hit + 60 s
    assert store.peek("rate", "k", limit).remaining == 0  # refusals are not counted
    assert store.hit("rate", "other", limit).allowed  # counts are per identity...
    assert store.hit("quota", "k", limit).allowed  # ... and per scope

    now = time.time()
    headers = rate_limit_headers(refused, now=now)
    assert headers == {
        "RateLimit-Limit": "5",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "60",
        "Retry-After": "60",
    }
    assert "Retry-After" not in rate_limit_headers(states[0])
    tiny = LimitState(False, 1, 0, now + 0.2, 0.2)
    assert rate_limit_headers(tiny, now=now)["Retry-After"] == "1"  # whole seconds, at least 1

    store.clear("rate", "k", limit)
    assert store.hit("rate", "k", limit).remaining == 4


def test_moving_window_frees_hits_as_they_age():
    store, limit = LimitStore(), parse_limit("2/second")
    assert store.hit("r", "k", limit).allowed and store.hit("r", "k", limit).allowed
    refused = store.hit("r", "k", limit)
    assert not refused.allowed and 0 < refused.retry_after <= 1
    time.sleep(refused.retry_after + 0.05)
    assert store.hit("r", "k", limit).allowed


def test_cost_counts_only_when_it_fits():
    store = LimitStore()
    for limit in (parse_limit("5/min"), parse_limit("5/day", "quota")):
        assert store.hit("c", "k", limit, cost=3).remaining == 2
        refused = store.hit("c", "k", limit, cost=3)
        assert not refused.allowed and refused.remaining == 2  # nothing taken
        assert store.hit("c", "k", limit, cost=2).allowed
        with pytest.raises(ValueError, match="cost"):
            store.hit("c", "k", limit, cost=0)


def test_quota_fixed_window_resets_at_the_window_edge():
    store, quota = LimitStore(), parse_limit("3/day", "quota")
    day = 86400.0
    edge = (time.time() // day + 1) * day  # next 00:00 UTC
    states = [store.hit("quota", "k", quota) for _ in range(4)]
    assert [s.allowed for s in states] == [True, True, True, False]
    assert {s.reset_at for s in states} == {edge}
    assert states[-1].retry_after == pytest.approx(edge - time.time(), abs=2)
    assert store.peek("quota", "k", quota) == LimitState(
        False, 3, 0, edge, pytest.approx(states[-1].retry_after, abs=2)
    )

    short = parse_limit("2/2 seconds", "quota")  # clock-aligned 2 s windows
    edge = (time.time() // 2 + 1) * 2
    if edge - time.time() < 0.3:  # too close to the edge to test within one window
        time.sleep(edge - time.time() + 0.01)
        edge += 2
    assert [store.hit("q", "k", short).allowed for _ in range(3)] == [True, True, False]
    time.sleep(max(0.0, edge - time.time()) + 0.05)
    state = store.hit("q", "k", short)
    assert state.allowed and state.remaining == 1 and state.reset_at == edge + 2

    store.clear("quota", "k", quota)
    assert store.peek("quota", "k", quota).remaining == 3


def test_memory_stores_do_not_share_counts():
    """The old behaviour: one in-memory count per process, so N replicas allow N times L."""
    limit = parse_limit("3/min")
    replicas = [LimitStore("memory://"), LimitStore("memory://")]
    allowed = sum(replicas[i % 2].hit("rate", "k", limit).allowed for i in range(12))
    assert allowed == 6


def test_redis_stores_share_one_count(redis_url):
    limit, quota = parse_limit("5/min"), parse_limit("4/day", "quota")
    replicas = [LimitStore(redis_url), LimitStore(redis_url)]
    assert all(store.shared for store in replicas)
    allowed = sum(replicas[i % 2].hit("rate", "k", limit).allowed for i in range(15))
    assert allowed == 5
    refused = replicas[0].hit("rate", "k", limit)
    assert not refused.allowed and 59 < refused.retry_after <= 60
    assert sum(replicas[i % 2].hit("quota", "k", quota).allowed for i in range(10)) == 4
    assert replicas[1].peek("quota", "k", quota).remaining == 0

    # concurrent hits from both stores still never exceed the limit (atomic Redis scripts)
    burst = parse_limit("20/min")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: replicas[i % 2].hit("b", "k", burst).allowed, range(60)))
    assert sum(results) == 20

    replicas[1].clear("rate", "k", limit)
    assert replicas[0].hit("rate", "k", limit).remaining == 4
    other = LimitStore(redis_url, namespace="another-deployment")
    assert other.peek("quota", "k", quota).remaining == 4  # namespaces keep counts apart


def test_unreachable_redis_is_a_clear_error():
    from redis_support import _free_port

    port = _free_port()  # nothing listens there
    uri = f"redis://:hunter2@127.0.0.1:{port}/0"
    with pytest.raises(LimitStoreError, match="cannot reach Redis") as err:
        LimitStore(uri, timeout=1.0)
    message = str(err.value)
    assert f"redis://:***@127.0.0.1:{port}/0" in message and "hunter2" not in message
    assert "--limits-store memory://" in message


def test_store_uris_are_validated():
    for uri in [
        "http://localhost:6379",
        "redis://",
        "redis://host:port",
        "memory://x",
        "redis://h/db",
    ]:
        with pytest.raises(ValueError, match="invalid limits store"):
            LimitStore(uri)
        with pytest.raises(ValueError, match="invalid limits store"):
            ServeConfig(limits_store=uri)
    with pytest.raises(ValueError, match=r"redis://:\*\*\*@h:x") as err:
        ServeConfig(limits_store="redis://:secret@h:x")
    assert "secret" not in str(err.value)
    assert ServeConfig().limits_store == "memory://"
    assert ServeConfig(limits_store="redis://127.0.0.1:6379/2").limits_store.endswith("/2")
