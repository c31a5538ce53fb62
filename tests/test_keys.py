"""Key store and `nnobf keys`: salted hashes only, names or keys as references, live changes."""

from __future__ import annotations

import sqlite3

import pytest
from typer.testing import CliRunner

from nnobfuscator.cli import app
from nnobfuscator.serving.config import RateLimit, parse_rate_limits
from nnobfuscator.serving.keystore import KeyStore, KeyStoreError, key_checksum
from nnobfuscator.serving.ratelimit import RateLimiter


@pytest.fixture
def store(tmp_path) -> KeyStore:
    return KeyStore(tmp_path / "keys.sqlite")


def test_create_verify_and_only_hashes_stored(store):
    record, key = store.create("pro", name="alice")
    assert key.startswith("nnobf_") and record.tier == "pro"
    assert store.verify(key) == record
    with sqlite3.connect(store.path) as db:
        dump = "\n".join(db.iterdump())
    secret = key.split("_", 2)[2][:-6]
    assert secret not in dump and key not in dump
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
    assert "eve" in listed.stdout and key not in listed.stdout
    assert runner.invoke(app, ["keys", "revoke", "eve"]).exit_code == 0
    assert store.verify(key).revoked
    other = tmp_path / "other.sqlite"
    made = runner.invoke(app, ["keys", "create", "--tier", "free", "--keys", str(other)])
    assert KeyStore(other).verify(made.stdout.strip().splitlines()[-1]).tier == "free"
    missing = runner.invoke(app, ["keys", "revoke", "nobody"])
    assert missing.exit_code == 2 and "no key named 'nobody'" in missing.output


def test_rate_limits_parse_and_refill():
    limits = parse_rate_limits("free=2/s, pro=600/min, *=none")
    assert limits == {"free": RateLimit(2, 1.0), "pro": RateLimit(600, 60.0), "*": None}
    with pytest.raises(ValueError, match="COUNT/PERIOD"):
        parse_rate_limits("free=fast")
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert limiter.acquire("k", limits["free"]) is None
    assert limiter.acquire("k", limits["free"]) is None
    wait = limiter.acquire("k", limits["free"])
    assert wait == pytest.approx(0.5)
    assert limiter.acquire("other", limits["free"]) is None  # buckets are per key
    now[0] += 0.5
    assert limiter.acquire("k", limits["free"]) is None
    assert limiter.acquire("k", None) is None
