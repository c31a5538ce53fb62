"""API keys in SQLite: salted hashes only, looked up on every request (no restart needed).

A key reads ``nnobf_<id>_<secret>``: ``id`` is a public handle used to find the row, ``secret`` is
never stored, only ``sha256(salt || secret)``, compared in constant time. The database runs in
WAL mode so a server reads while ``nnobf keys ...`` writes, and every write is one transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

KEY_PREFIX = "nnobf"
_TIER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    tier TEXT,
    owner INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    revoked_at TEXT
)
"""
_COLUMNS = "id, name, tier, owner, created_at, revoked_at"


class KeyStoreError(ValueError):
    """A key store operation got a bad argument (unknown key, bad tier name, duplicate name)."""


@dataclass(frozen=True)
class ApiKey:
    """One stored key, without its secret.

    Args:
        id: the public handle embedded in the key (safe to log).
        name: an optional label, unique in the store.
        tier: the tier the key unlocks; ``None`` for an owner key means the highest tier.
        owner: owner keys may pick any tier per request and compare all tiers.
        created_at: ISO 8601 UTC time of creation.
        revoked_at: ISO 8601 UTC time of revocation, or ``None`` while the key is valid.
    """

    id: str
    name: str | None
    tier: str | None
    owner: bool
    created_at: str
    revoked_at: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def default_keys_path() -> Path:
    """``$NNOBF_HOME/keys.sqlite`` (``~/.cache/nnobfuscator/keys.sqlite`` without NNOBF_HOME)."""
    from nnobfuscator.home import cache_dir

    return cache_dir() / "keys.sqlite"


def _hash(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _split_key(token: str) -> tuple[str, str] | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def check_tier_name(tier: str) -> str:
    """Return ``tier`` if it is a valid tier name, else raise :class:`KeyStoreError`."""
    if not isinstance(tier, str) or not _TIER_PATTERN.match(tier):
        raise KeyStoreError(
            f"invalid tier name {tier!r}: use letters, digits, '_', '-' or '.' (e.g. 'pro')"
        )
    return tier


class KeyStore:
    """A SQLite file of API keys, safe to share between processes and threads.

    Example:
        >>> store = KeyStore("keys.sqlite")
        >>> record, key = store.create("pro", name="alice")
        >>> store.verify(key).tier
        'pro'
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_keys_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._dummy_salt = os.urandom(16)
        with self._transaction() as db:
            db.execute(_SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=10000")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # --- writes ------------------------------------------------------------------------------
    def create(
        self, tier: str | None, *, name: str | None = None, owner: bool = False
    ) -> tuple[ApiKey, str]:
        """Create a key; returns its record and the key itself (shown once, never stored).

        Raises:
            KeyStoreError: a bad tier name, a missing tier for a non-owner key, or a taken name.
        """
        if tier is None and not owner:
            raise KeyStoreError("a key needs a tier (e.g. --tier pro); only owner keys may omit it")
        if tier is not None:
            check_tier_name(tier)
        if name is not None and (not name.strip() or name.startswith(f"{KEY_PREFIX}_")):
            raise KeyStoreError(f"invalid key name {name!r}: use a non-empty label like 'alice'")
        key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), os.urandom(16)
        record = ApiKey(key_id, name, tier, owner, _now(), None)
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO api_keys (id, name, salt, hash, tier, owner, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key_id, name, salt, _hash(salt, secret), tier, int(owner), record.created_at),
                )
        except sqlite3.IntegrityError:
            raise KeyStoreError(f"a key named {name!r} already exists; pick another name") from None
        return record, f"{KEY_PREFIX}_{key_id}_{secret}"

    def set_tier(self, ref: str, tier: str) -> ApiKey:
        """Move a key (given as the key itself, its name or its id) to ``tier``."""
        check_tier_name(tier)
        with self._transaction() as db:
            record = self._resolve(db, ref)
            db.execute("UPDATE api_keys SET tier = ? WHERE id = ?", (tier, record.id))
        return self.get(record.id)

    def revoke(self, ref: str) -> ApiKey:
        """Revoke a key (given as the key itself, its name or its id); idempotent."""
        with self._transaction() as db:
            record = self._resolve(db, ref)
            db.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (_now(), record.id),
            )
        return self.get(record.id)

    # --- reads -------------------------------------------------------------------------------
    def list_keys(self) -> list[ApiKey]:
        """Every key, oldest first (records only: secrets are not stored)."""
        rows = self._connection().execute(
            f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id"
        )
        return [_record(row) for row in rows]

    def get(self, key_id: str) -> ApiKey:
        row = (
            self._connection()
            .execute(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
            .fetchone()
        )
        if row is None:
            raise KeyStoreError(f"no key with id {key_id!r}; see `nnobf keys list`")
        return _record(row)

    def verify(self, token: str) -> ApiKey | None:
        """The record of a presented key, or ``None`` when it is malformed or unknown.

        A revoked key is returned (check ``.revoked``) so callers can say why it was refused.
        """
        parts = _split_key(token)
        row = None
        if parts is not None:
            row = (
                self._connection()
                .execute(f"SELECT {_COLUMNS}, salt, hash FROM api_keys WHERE id = ?", (parts[0],))
                .fetchone()
            )
        if row is None:
            # Spend the same hashing work on unknown ids as on known ones.
            hmac.compare_digest(_hash(self._dummy_salt, token), bytes(32))
            return None
        if not hmac.compare_digest(_hash(row[6], parts[1]), row[7]):
            return None
        return _record(row[:6])

    def _resolve(self, db: sqlite3.Connection, ref: str) -> ApiKey:
        """Find a key by the key itself, its name or its id."""
        if _split_key(ref) is not None:
            record = self.verify(ref)
            if record is None:
                raise KeyStoreError("that key is not in this key store (check --keys PATH)")
            return record
        row = db.execute(
            f"SELECT {_COLUMNS} FROM api_keys WHERE name = ? OR id = ? ORDER BY name = ? DESC",
            (ref, ref, ref),
        ).fetchone()
        if row is None:
            raise KeyStoreError(
                f"no key named {ref!r} in {self.path}; pass the key itself, its name or its id "
                "(see `nnobf keys list`)"
            )
        return _record(row)

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def _record(row: tuple) -> ApiKey:
    key_id, name, tier, owner, created_at, revoked_at = row
    return ApiKey(key_id, name, tier, bool(owner), created_at, revoked_at)
