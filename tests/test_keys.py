"""Key store and `nnobf keys`: salted hashes only, names or keys as references, live changes."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from nnobfuscator.cli import app
from nnobfuscator.serving.api_keys import ApiKey, KeyStore
from nnobfuscator.serving.config import RateLimit, parse_rate_limits
from nnobfuscator.serving.key_format import (
    KeyStoreError,
    key_checksum,
    key_stub,
    parse_duration,
    parse_key,
)
from nnobfuscator.serving.usage import RedisUsage, SqliteUsage, UsageRow, usage_meter


def _leaks(text: str, key: str) -> bool:
    """Whether ``key`` or its secret appears in ``text`` (a bool, so a failure prints no key)."""
    return key in text or key.split("_", 2)[2][:-6] in text


@pytest.fixture
def store(tmp_path) -> KeyStore:
    return KeyStore(tmp_path / "keys.sqlite")


def test_create_verify_and_only_hashes_stored(store):
    record, key = store.create("pro", name="alice")
    assert key.startswith("nnobf_") and record.tier == "pro"
    assert store.verify(key) == record
    with sqlite3.connect(store.path) as db:
        dump = "\n".join(db.iterdump())
    leaked = _leaks(dump, key)
    assert not leaked
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize(
    "token",
    ["", "nnobf", "nnobf__x", "Bearer x", "nnobf_000000000000_wrongsecret", "other_abc_def"],
)
def test_unknown_or_malformed_keys_do_not_verify(store, token):
    store.create("free")
    assert store.verify(token) is None


def test_wrong_secret_for_a_known_id_does_not_verify(store):
    _, key = store.create("free")
    prefix, key_id, rest = key.split("_", 2)
    secret = rest[:-6]
    wrong = f"{prefix}_{key_id}_{secret[:-1]}{'x' if secret[-1] != 'x' else 'y'}"
    assert store.verify(wrong + key_checksum(wrong)) is None  # valid checksum, wrong secret


def test_set_tier_and_revoke_by_key_name_or_id(store):
    record, key = store.create("free", name="bob")
    assert store.set_tier(key, "pro").tier == "pro"
    assert store.set_tier("bob", "premium").tier == "premium"
    assert store.set_tier(record.id, "free").tier == "free"
    assert store.verify(key).tier == "free"
    revoked = store.revoke("bob")
    assert revoked.revoked and store.verify(key).revoked
    assert store.revoke(key).revoked_at == revoked.revoked_at  # idempotent


def test_changes_are_seen_by_another_connection(tmp_path):
    writer, reader = KeyStore(tmp_path / "k.sqlite"), KeyStore(tmp_path / "k.sqlite")
    _, key = writer.create("free")
    assert reader.verify(key).tier == "free"
    writer.set_tier(key, "premium")
    assert reader.verify(key).tier == "premium"


def test_clear_errors(store):
    store.create("free", name="carol")
    with pytest.raises(KeyStoreError, match="already exists"):
        store.create("pro", name="carol")
    with pytest.raises(KeyStoreError, match="invalid tier name"):
        store.create("pro tier")
    with pytest.raises(KeyStoreError, match="needs a tier"):
        store.create(None)
    with pytest.raises(KeyStoreError, match="no key named 'dave'"):
        store.revoke("dave")
    with pytest.raises(KeyStoreError, match="not a well-formed key"):
        store.set_tier("nnobf_abc_def", "pro")
    _, key = KeyStore(store.path.with_name("other.sqlite")).create("free")
    with pytest.raises(KeyStoreError, match="not in this key store"):
        store.set_tier(key, "pro")


def test_owner_key_may_omit_tier(store):
    record, key = store.create(None, owner=True, name="me")
    assert record.owner and record.tier is None
    assert store.verify(key).owner


def test_cli_contract(tmp_path, monkeypatch):
    """create prints the key alone on the last stdout line; set-tier/revoke take key or name."""
    monkeypatch.setenv("NNOBF_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--tier", "pro", "--name", "eve"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[-1]
    store = KeyStore(tmp_path / "home" / "keys.sqlite")  # the default location
    assert store.verify(key).tier == "pro"
    assert runner.invoke(app, ["keys", "set-tier", key, "free"]).exit_code == 0
    assert store.verify(key).tier == "free"
    listed = runner.invoke(app, ["keys", "list"])
    leaked = _leaks(listed.stdout, key)
    assert "eve" in listed.stdout and not leaked
    assert runner.invoke(app, ["keys", "revoke", "eve"]).exit_code == 0
    assert store.verify(key).revoked
    other = tmp_path / "other.sqlite"
    made = runner.invoke(app, ["keys", "create", "--tier", "free", "--keys", str(other)])
    assert KeyStore(other).verify(made.stdout.strip().splitlines()[-1]).tier == "free"
    missing = runner.invoke(app, ["keys", "revoke", "nobody"])
    assert missing.exit_code == 2 and "no key named 'nobody'" in missing.output


def test_rate_limits_parse():
    limits = parse_rate_limits("free=2/s, pro=600/min, *=none")
    assert limits == {"free": RateLimit(2, 1.0), "pro": RateLimit(600, 60.0), "*": None}
    with pytest.raises(ValueError, match="COUNT/PERIOD"):
        parse_rate_limits("free=fast")


# --- key lifecycle: checksum, expiry, rotation, audit, usage (issue 13) ---------------------------


class Clock:
    """A settable clock for KeyStore and the usage meters."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def timed(tmp_path, clock) -> KeyStore:
    return KeyStore(tmp_path / "keys.sqlite", clock=clock)


def test_key_format_has_prefix_and_checksum(store):
    record, key = store.create("pro")
    ok = re.fullmatch(r"nnobf_[0-9a-f]{12}_[0-9A-Za-z]{30}[0-9A-Za-z]{6}", key) is not None
    assert ok and key.startswith(f"nnobf_{record.id}_")
    assert key[-6:] == key_checksum(key[:-6])
    parsed_id = (parse_key(key) or ("",))[0]  # not the tuple: a failure must not print the secret
    assert parsed_id == record.id
    assert record.stub == f"nnobf_{record.id}_…" == key_stub(record.id)
    # one changed character in the checksum, the secret's end or its start
    for j in (len(key) - 1, len(key) - 7, len(f"nnobf_{record.id}_")):
        typo = key[:j] + ("A" if key[j] != "A" else "B") + key[j + 1 :]
        rejected = parse_key(typo) is None and store.verify(typo) is None
        assert rejected


def test_malformed_keys_and_bad_checksums_never_touch_the_database(store, monkeypatch):
    _, key = store.create("free")
    body = key[:-6]
    bad_checksum = body + ("000000" if key[-6:] != "000000" else "000001")
    queries = []

    def no_database():
        queries.append(1)
        raise AssertionError("the database was queried")

    monkeypatch.setattr(store, "_connection", no_database)
    for token in [
        "",
        "nnobf",
        "nnobf__x",
        "Bearer x",
        "other_abc_def",
        key + "x",
        bad_checksum,
        key.replace("nnobf_", "nnobg_"),
        key[:-1],
    ]:
        assert store.verify(token) is None
    assert queries == []
    with pytest.raises(AssertionError, match="queried"):
        store.verify(key)  # a well-formed key does reach the database


def test_keys_of_the_old_format_keep_working(store):
    """Keys made before the checksum (``nnobf_<12 hex>_<token_urlsafe(32)>``) still verify."""
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), os.urandom(16)
    with sqlite3.connect(store.path) as db:
        db.execute(
            "INSERT INTO api_keys (id, name, salt, hash, tier, owner, created_at) "
            "VALUES (?, 'old', ?, ?, 'pro', 0, '2025-01-01T00:00:00+00:00')",
            (key_id, salt, hashlib.sha256(salt + secret.encode()).digest()),
        )
    old = f"nnobf_{key_id}_{secret}"
    assert store.verify(old).tier == "pro" and store.verify(old).refusal() is None
    assert store.verify(f"nnobf_{key_id}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}") is None
    assert store.revoke(old).refusal()[0] == "revoked_key"


def test_an_old_database_migrates_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT UNIQUE, salt BLOB NOT NULL, "
            "hash BLOB NOT NULL, tier TEXT, owner INTEGER NOT NULL DEFAULT 0, "
            "created_at TEXT NOT NULL, revoked_at TEXT)"
        )
        db.execute(
            "INSERT INTO api_keys VALUES ('abcdef012345', 'legacy', x'00', x'00', 'free', 0, "
            "'2025-01-01T00:00:00+00:00', NULL)"
        )
    store = KeyStore(path)
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(api_keys)")}
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"expires_at", "last_used_at", "replaced_by", "retires_at"} <= columns
    assert "audit" in tables
    record = store.find("legacy")
    assert record.tier == "free" and record.expires_at is None and record.status() == "active"
    assert store.set_expiry("legacy", timedelta(days=1)).expires_at is not None
    KeyStore(path)  # opening again changes nothing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("15m", timedelta(minutes=15)),
        ("15min", timedelta(minutes=15)),
        ("90s", timedelta(seconds=90)),
        ("0", timedelta(0)),
        ("never", None),
    ],
)
def test_durations(text, expected):
    assert parse_duration(text) == expected


def test_bad_duration_is_a_clear_error():
    with pytest.raises(KeyStoreError, match="invalid duration '3 weeks'"):
        parse_duration("3 weeks")


def test_expired_keys_are_refused(timed, clock):
    record, key = timed.create("pro", name="temp", expires_in=timedelta(days=30))
    assert record.expires_at == "2026-03-31T12:00:00+00:00"
    assert timed.verify(key).refusal(clock()) is None
    clock.advance(days=29, hours=23)
    assert timed.verify(key).status(clock()) == "active"
    clock.advance(hours=1)
    code, message = timed.verify(key).refusal(clock())
    assert code == "expired_key" and "expired at 2026-03-31T12:00:00+00:00" in message
    assert timed.verify(key).status(clock()) == "expired"
    assert timed.set_expiry("temp", None).refusal(clock()) is None  # never expires again
    assert timed.set_expiry("temp", timedelta(0)).refusal(clock())[0] == "expired_key"
    assert timed.revoke("temp").refusal(clock())[0] == "revoked_key"


def test_refusal_defaults_to_the_wall_clock(store):
    record, key = store.create("pro", expires_in=timedelta(hours=1))
    assert store.verify(key).refusal() is None
    past = ApiKey(
        record.id, None, "pro", False, record.created_at, None, "2000-01-01T00:00:00+00:00"
    )
    assert past.refusal()[0] == "expired_key"


def test_rotate_keeps_the_old_key_during_the_grace_period(timed, clock):
    old, old_key = timed.create("pro", name="svc", expires_in=timedelta(days=10))
    clock.advance(days=2)
    new, new_key, old_after = timed.rotate("svc", grace=timedelta(hours=24))
    assert (new.tier, new.owner, new.name) == ("pro", False, "svc")
    assert new.expires_at == "2026-03-13T12:00:00+00:00"  # the old key's 10-day lifetime
    assert old_after.name is None and old_after.replaced_by == new.id
    assert timed.find("svc").id == new.id
    assert timed.verify(new_key).refusal(clock()) is None
    clock.advance(hours=23, minutes=59)
    assert timed.verify(old_key).refusal(clock()) is None  # still within grace
    clock.advance(minutes=1)
    assert timed.verify(old_key).refusal(clock()) == (
        "rotated_key",
        "the API key was rotated; use its replacement",
    )
    assert timed.verify(old_key).status(clock()) == "rotated"
    assert timed.verify(new_key).refusal(clock()) is None
    with pytest.raises(KeyStoreError, match="already rotated"):
        timed.rotate(old.id)
    owner, _ = timed.create(None, owner=True)
    rotated_owner, _, _ = timed.rotate(owner.id, grace=timedelta(0), expires_in=None)
    assert rotated_owner.owner and rotated_owner.tier is None
    assert timed.get(owner.id).refusal(clock())[0] == "rotated_key"  # no grace: refused at once
    timed.revoke(new.id)
    with pytest.raises(KeyStoreError, match="revoked"):
        timed.rotate(new.id)


def test_every_change_is_audited_and_the_log_is_append_only(timed, clock):
    record, key = timed.create("free", name="aud")
    timed.set_tier("aud", "pro")
    timed.set_expiry("aud", timedelta(days=1))
    new, new_key, _ = timed.rotate("aud")
    timed.revoke(new.id)
    timed.revoke(new.id)  # idempotent: not logged twice
    rows = timed.audit(None)
    assert [(r.action, r.key_id) for r in rows] == [
        ("create", record.id),
        ("set-tier", record.id),
        ("set-expiry", record.id),
        ("create", new.id),
        ("rotate", record.id),
        ("revoke", new.id),
    ]
    assert rows[1].detail == "free -> pro" and f"replaced-by={new.id}" in rows[4].detail
    leaked = any(_leaks(r.detail, key) or _leaks(r.detail, new_key) for r in rows)
    assert not leaked
    assert [r.action for r in timed.audit(2)] == ["rotate", "revoke"]
    assert [r.action for r in timed.audit(None, key_id=new.id)] == ["create", "revoke"]
    with sqlite3.connect(timed.path) as db:
        for sql in ("UPDATE audit SET action = 'x'", "DELETE FROM audit"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute(sql)
    assert len(timed.audit(None)) == 6
    writers = [n for n in dir(timed) if "audit" in n and n not in {"audit", "_audit"}]
    assert writers == []  # no call updates or deletes audit rows
    with pytest.raises(AttributeError):
        rows[0].action = "tampered"  # frozen


def test_sqlite_usage_per_key_tier_and_day(timed, clock):
    a, _ = timed.create("pro", name="a")
    b, _ = timed.create("free", name="b")
    meter = usage_meter(timed.path, None, clock=clock)
    assert isinstance(meter, SqliteUsage)
    yesterday = clock() - timedelta(days=1)
    for _ in range(3):
        meter.record(a.id, "pro")
    meter.record(a.id, "free")
    meter.record(a.id, "pro", when=yesterday)
    meter.record(b.id, "free", when=clock() - timedelta(days=9))  # outside a 7-day window
    assert meter.pending() == 6 and meter.rows() == []
    meter.flush()
    meter.record(a.id, "pro")
    meter.flush()  # adds to the stored counts
    assert meter.pending() == 0
    assert meter.rows() == [
        UsageRow("2026-02-28", a.id, "pro", 1),
        UsageRow("2026-03-01", a.id, "free", 1),
        UsageRow("2026-03-01", a.id, "pro", 4),
    ]
    assert meter.rows(b.id, days=10) == [UsageRow("2026-02-20", b.id, "free", 1)]
    assert meter.rows(b.id) == []
    assert timed.get(a.id).last_used_at == "2026-03-01T12:00:00+00:00"
    assert timed.get(b.id).last_used_at == "2026-02-20T12:00:00+00:00"
    assert meter.last_used()[a.id] == "2026-03-01T12:00:00+00:00"
    meter.start_background_flush(interval_s=0.05)
    meter.record(b.id, "free")
    deadline = time.monotonic() + 5
    while meter.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    meter.record(b.id, "free")
    meter.close()  # stops the thread and flushes the rest
    assert meter.rows(b.id) == [UsageRow("2026-03-01", b.id, "free", 2)]
    with sqlite3.connect(timed.path) as db:
        stored = db.execute("SELECT SUM(requests) FROM key_usage").fetchone()[0]
    assert stored == 9


def test_failed_flush_keeps_the_counts(timed, clock, monkeypatch):
    meter = SqliteUsage(timed.path, clock=clock)
    meter.record("k", "pro")

    def broken(*_):
        raise sqlite3.OperationalError("disk full")

    monkeypatch.setattr(meter, "_write", broken)
    with pytest.raises(sqlite3.OperationalError):
        meter.flush()
    assert meter.pending() == 1
    monkeypatch.undo()
    meter.flush()
    assert meter.rows() == [UsageRow("2026-03-01", "k", "pro", 1)]


def test_redis_usage_per_key_tier_and_day(request, clock):
    pytest.importorskip("redis")
    try:
        url = request.getfixturevalue("redis_url")
    except pytest.FixtureLookupError:
        pytest.skip("the redis_url fixture (tests/conftest.py) is not available")
    import redis

    meter = usage_meter("unused.sqlite", url, clock=clock)
    assert isinstance(meter, RedisUsage)
    meter.record("aaa", "pro")
    meter.record("aaa", "pro")
    meter.record("aaa", "free", when=clock() - timedelta(days=1))
    meter.record("bbb", "free")
    meter.flush()
    meter.record("aaa", "pro")
    meter.close()
    again = RedisUsage(url, clock=clock)
    assert again.rows() == [
        UsageRow("2026-02-28", "aaa", "free", 1),
        UsageRow("2026-03-01", "aaa", "pro", 3),
        UsageRow("2026-03-01", "bbb", "free", 1),
    ]
    assert again.rows("bbb", days=1) == [UsageRow("2026-03-01", "bbb", "free", 1)]
    assert again.last_used() == {
        "aaa": "2026-03-01T12:00:00+00:00",
        "bbb": "2026-03-01T12:00:00+00:00",
    }
    again.close()
    with redis.Redis.from_url(url, decode_responses=True) as client:
        assert client.hgetall("nnobf:usage:2026-03-01") == {"aaa:pro": "3", "bbb:free": "1"}
        ttl = client.ttl("nnobf:usage:2026-03-01")
    assert 399 * 86400 < ttl <= 400 * 86400


def test_cli_lifecycle(tmp_path):
    """create --expires, rotate (new key alone on the last line), list (stubs, no secrets),
    set-expiry, audit and usage."""
    runner, path = CliRunner(), tmp_path / "k.sqlite"

    def run(*args: str):
        result = runner.invoke(app, ["keys", *args, "--keys", str(path)])
        assert result.exit_code == 0, result.output
        return result

    key = run("create", "--tier", "pro", "--name", "ci", "--expires", "30d").stdout.splitlines()[-1]
    store = KeyStore(path)
    record = store.verify(key)
    assert record.expires_at is not None and record.name == "ci"
    rotated = run("rotate", "ci", "--grace", "1h")
    new_key = rotated.stdout.strip().splitlines()[-1]
    new = store.verify(new_key)
    assert new.name == "ci" and new.tier == "pro" and new.id != record.id
    assert "keeps working until" in rotated.stderr
    run("set-expiry", "ci", "never")
    assert store.find("ci").expires_at is None
    meter = SqliteUsage(path)
    meter.record(new.id, "pro")
    meter.record(new.id, "free")
    meter.record(new.id, "pro")
    meter.close()
    listed = run("list").stdout
    assert record.stub in listed and new.stub in listed
    assert "rotated to" in listed and "ci" in listed and "never" in listed
    leaked = _leaks(listed, key) or _leaks(listed, new_key)
    assert not leaked
    audit_out = run("audit", "--limit", "10").stdout
    for action in ("create", "rotate", "set-expiry"):
        assert action in audit_out
    leaked = _leaks(audit_out, key) or _leaks(audit_out, new_key)
    assert not leaked
    used = run("usage", "ci", "--days", "2").stdout
    today = datetime.now(UTC).date().isoformat()
    line = next(row for row in used.splitlines() if today in row)
    assert re.search(r"\b1\b.*\b2\b.*\b3\b", line), used  # free, pro, total
    bad = runner.invoke(app, ["keys", "create", "--tier", "x", "--expires", "soon"])
    assert bad.exit_code == 2 and "invalid duration" in bad.output


def test_keys_commands_import_no_torch():
    code = (
        "import sys, nnobfuscator, nnobfuscator.serving.cli, nnobfuscator.cli; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "import nnobfuscator.calibration.calibrator; from nnobfuscator import calibrate; "
        "assert callable(calibrate) and calibrate.__module__ == 'nnobfuscator.calibration.calibrator'; "
        "missing = [n for n in nnobfuscator.__all__ if getattr(nnobfuscator, n, None) is None]; "
        "assert not missing, missing"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_help_lists_every_command():
    out = CliRunner().invoke(app, ["--help"]).stdout
    for command in (
        "demo",
        "calibrate",
        "eval",
        "info",
        "strategies",
        "serve",
        "keys",
        "attack",
        "seal",
        "unseal",
    ):
        assert command in out
    keys_help = CliRunner().invoke(app, ["keys", "--help"]).stdout
    for command in (
        "create",
        "list",
        "rotate",
        "set-tier",
        "set-expiry",
        "revoke",
        "audit",
        "usage",
    ):
        assert command in keys_help


def test_tokens_are_metered_beside_requests_and_old_files_gain_the_column(tmp_path, clock):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # a keys file from before tokens were metered
        db.execute(
            "CREATE TABLE key_usage (day TEXT NOT NULL, key_id TEXT NOT NULL, tier TEXT NOT NULL,"
            " requests INTEGER NOT NULL, PRIMARY KEY (day, key_id, tier))"
        )
        db.execute("INSERT INTO key_usage VALUES ('2026-03-01', 'k', 'free', 2)")
    meter = SqliteUsage(path, clock=clock)
    meter.record("k", "free")
    meter.record_tokens("k", "free", 30)
    meter.record_tokens("j", "pro", 12)
    meter.flush()
    assert meter.rows() == [
        UsageRow("2026-03-01", "j", "pro", 0, 12),
        UsageRow("2026-03-01", "k", "free", 3, 30),
    ]


def test_redis_usage_meters_tokens(request, clock):
    pytest.importorskip("redis")
    try:
        url = request.getfixturevalue("redis_url")
    except pytest.FixtureLookupError:
        pytest.skip("the redis_url fixture (tests/conftest.py) is not available")
    meter = RedisUsage(url, clock=clock)
    meter.record("aaa", "free")
    meter.record_tokens("aaa", "free", 40)
    meter.record_tokens("bbb", "pro", 7)
    meter.close()
    assert RedisUsage(url, clock=clock).rows() == [
        UsageRow("2026-03-01", "aaa", "free", 1, 40),
        UsageRow("2026-03-01", "bbb", "pro", 0, 7),
    ]
