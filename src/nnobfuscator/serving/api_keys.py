"""API keys in SQLite: salted hashes only, looked up on every request (no restart needed).

Key format: :mod:`nnobfuscator.serving.key_format` (``nnobf_<id>_<secret><check>``).

Lifecycle: a key may expire (``expires_at``), be revoked (``revoked_at``) or be rotated: its
replacement gets the same tier, owner flag and name, and the old key keeps working until
``retires_at`` (the end of the grace period). :meth:`ApiKey.refusal` says why a key may not be
used now. Every change (create, rotate, set-tier, set-expiry, revoke) appends a row to the
``audit`` table, which SQLite triggers keep append-only; this module has no call that changes
or deletes audit rows.

Schema and migration of older files: :mod:`nnobfuscator.serving.key_database`.

The database runs in WAL mode so a server reads while ``nnobf keys ...`` writes, and every write
is one transaction.
"""

from __future__ import annotations

import hmac
import os
import re
import sqlite3
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from nnobfuscator.serving.key_database import (
    connect,
    default_keys_path,
    ensure_schema,
    transaction,
)
from nnobfuscator.serving.key_format import (
    KEY_PREFIX,
    KeyStoreError,
    check_tier_name,
    hash_secret,
    key_stub,
    new_key,
    parse_key,
)

_COLUMNS = (
    "id, name, tier, owner, created_at, revoked_at, expires_at, last_used_at, replaced_by, "
    "retires_at"
)
_NCOLUMNS = len(_COLUMNS.split(","))

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")


def _parse_time(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _passed(moment: str | None, now: datetime) -> bool:
    return moment is not None and _parse_time(moment) <= now


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
        expires_at: ISO 8601 UTC time from which the key is refused, or ``None`` (never).
        last_used_at: ISO 8601 UTC time of the last metered request (updated on usage flush).
        replaced_by: the id of the key that replaced this one by rotation, or ``None``.
        retires_at: for a rotated key, the end of its grace period (refused from then on).
    """

    id: str
    name: str | None
    tier: str | None
    owner: bool
    created_at: str
    revoked_at: str | None
    expires_at: str | None = None
    last_used_at: str | None = None
    replaced_by: str | None = None
    retires_at: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def stub(self) -> str:
        """``nnobf_<id>_…``: identifies the key without its secret (safe to display)."""
        return key_stub(self.id)

    def status(self, now: datetime | None = None) -> str:
        """``"active"``, ``"expired"``, ``"revoked"`` or ``"rotated"`` (after its grace) at ``now``."""
        now = now or _utcnow()
        if self.revoked:
            return "revoked"
        if self.replaced_by is not None and _passed(self.retires_at, now):
            return "rotated"
        if _passed(self.expires_at, now):
            return "expired"
        return "active"

    def refusal(self, now: datetime | None = None) -> tuple[str, str] | None:
        """``None`` when the key may be used at ``now``, else ``(code, message)`` for the caller.

        Codes: ``"revoked_key"``, ``"rotated_key"`` (grace period over), ``"expired_key"``.
        """
        status = self.status(now)
        if status == "revoked":
            return (
                "revoked_key",
                f"the API key was revoked at {self.revoked_at}; ask the model owner for a new one",
            )
        if status == "rotated":
            return "rotated_key", "the API key was rotated; use its replacement"
        if status == "expired":
            return (
                "expired_key",
                f"the API key expired at {self.expires_at}; ask the model owner for a new one",
            )
        return None


@dataclass(frozen=True)
class AuditRow:
    """One entry of the append-only audit log (never holds a secret)."""

    at: str
    action: str
    key_id: str | None
    detail: str


class KeyStore:
    """A SQLite file of API keys, safe to share between processes and threads.

    Args:
        path: the SQLite file (created, or migrated in place, on open).
        clock: returns the current time (timezone-aware); tests inject one.

    Example:
        >>> store = KeyStore("keys.sqlite")
        >>> record, key = store.create("pro", name="alice", expires_in=parse_duration("30d"))
        >>> store.verify(key).tier
        'pro'
    """

    def __init__(self, path: str | Path | None = None, *, clock: Clock | None = None) -> None:
        self.path = Path(path) if path is not None else default_keys_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock: Clock = clock or _utcnow
        self._local = threading.local()
        self._dummy_salt = os.urandom(16)
        with self._transaction() as db:
            ensure_schema(db)

    def now(self) -> datetime:
        return self.clock()

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = connect(self.path)
            self._local.db = db
        return db

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._connection())

    def _audit(self, db: sqlite3.Connection, action: str, key_id: str | None, detail: str) -> None:
        db.execute(
            "INSERT INTO audit (at, action, key_id, detail) VALUES (?, ?, ?, ?)",
            (_iso(self.now()), action, key_id, detail),
        )

    # --- writes ------------------------------------------------------------------------------
    def create(
        self,
        tier: str | None,
        *,
        name: str | None = None,
        owner: bool = False,
        expires_in: timedelta | None = None,
    ) -> tuple[ApiKey, str]:
        """Create a key; returns its record and the key itself (shown once, never stored).

        Args:
            expires_in: the key is refused from ``now + expires_in`` on; ``None``: never.

        Raises:
            KeyStoreError: a bad tier name, a missing tier for a non-owner key, or a taken name.
        """
        self._check_new(tier, name, owner)
        with self._transaction() as db:
            key_id, key = self._insert(db, tier, name, owner, expires_in, "")
        return self.get(key_id), key

    def _check_new(self, tier: str | None, name: str | None, owner: bool) -> None:
        if tier is None and not owner:
            raise KeyStoreError("a key needs a tier (e.g. --tier pro); only owner keys may omit it")
        if tier is not None:
            check_tier_name(tier)
        if name is not None and (not name.strip() or name.startswith(f"{KEY_PREFIX}_")):
            raise KeyStoreError(f"invalid key name {name!r}: use a non-empty label like 'alice'")
        if name is not None and re.fullmatch(r"[0-9a-f]{12}", name):
            raise KeyStoreError(
                f"invalid key name {name!r}: it reads like a key id, so commands given it could "
                "act on another key; pick a label like 'alice'"
            )

    def _insert(
        self,
        db: sqlite3.Connection,
        tier: str | None,
        name: str | None,
        owner: bool,
        expires_in: timedelta | None,
        note: str,
    ) -> tuple[str, str]:
        key_id, secret, key = new_key()
        salt, now = os.urandom(16), self.now()
        expires_at = _iso(now + expires_in) if expires_in is not None else None
        try:
            db.execute(
                "INSERT INTO api_keys (id, name, salt, hash, tier, owner, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key_id,
                    name,
                    salt,
                    hash_secret(salt, secret),
                    tier,
                    int(owner),
                    _iso(now),
                    expires_at,
                ),
            )
        except sqlite3.IntegrityError:
            raise KeyStoreError(f"a key named {name!r} already exists; pick another name") from None
        detail = (
            f"tier={tier or '(highest)'} name={name or '-'} owner={'yes' if owner else 'no'} "
            f"expires={expires_at or 'never'}{note}"
        )
        self._audit(db, "create", key_id, detail)
        return key_id, key

    def set_tier(self, ref: str, tier: str) -> ApiKey:
        """Move a key (given as the key itself, its name or its id) to ``tier``."""
        check_tier_name(tier)
        with self._transaction() as db:
            record = self._resolve(db, ref)
            db.execute("UPDATE api_keys SET tier = ? WHERE id = ?", (tier, record.id))
            self._audit(db, "set-tier", record.id, f"{record.tier or '(highest)'} -> {tier}")
        return self.get(record.id)

    def set_expiry(self, ref: str, expires_in: timedelta | None) -> ApiKey:
        """Make a key expire ``expires_in`` from now (``None``: never)."""
        expires_at = _iso(self.now() + expires_in) if expires_in is not None else None
        with self._transaction() as db:
            record = self._resolve(db, ref)
            db.execute("UPDATE api_keys SET expires_at = ? WHERE id = ?", (expires_at, record.id))
            self._audit(
                db,
                "set-expiry",
                record.id,
                f"{record.expires_at or 'never'} -> {expires_at or 'never'}",
            )
        return self.get(record.id)

    def revoke(self, ref: str) -> ApiKey:
        """Revoke a key (given as the key itself, its name or its id); idempotent."""
        with self._transaction() as db:
            record = self._resolve(db, ref)
            if record.revoked_at is None:
                db.execute(
                    "UPDATE api_keys SET revoked_at = ? WHERE id = ?",
                    (_iso(self.now()), record.id),
                )
                self._audit(db, "revoke", record.id, f"name={record.name or '-'}")
        return self.get(record.id)

    def rotate(
        self,
        ref: str,
        *,
        grace: timedelta = timedelta(hours=24),
        expires_in: timedelta | None | Literal["same"] = "same",
    ) -> tuple[ApiKey, str, ApiKey]:
        """Replace a key by a new one with the same tier, owner flag and name.

        The old key keeps working until ``now + grace`` (then it is refused as ``rotated``);
        its name moves to the new key, and the old record points at it (``replaced_by``).

        Args:
            grace: how long the old key keeps working (``timedelta(0)``: refused at once).
            expires_in: the new key's lifetime; ``"same"`` keeps the old key's lifetime
                (``expires_at - created_at``, or never), ``None`` is never.

        Returns:
            ``(new record, new key, old record)``; the new key is shown once, never stored.

        Raises:
            KeyStoreError: an unknown, revoked or already rotated key, or a negative grace.
        """
        if grace < timedelta(0):
            raise KeyStoreError("the grace period cannot be negative")
        with self._transaction() as db:
            old = self._resolve(db, ref)
            if old.revoked:
                raise KeyStoreError(f"key {old.id} is revoked; create a new key instead")
            if old.replaced_by is not None:
                raise KeyStoreError(
                    f"key {old.id} was already rotated; rotate its replacement {old.replaced_by}"
                )
            if expires_in == "same":
                expires_in = (
                    _parse_time(old.expires_at) - _parse_time(old.created_at)
                    if old.expires_at is not None
                    else None
                )
            retires_at = _iso(self.now() + grace)
            db.execute("UPDATE api_keys SET name = NULL WHERE id = ?", (old.id,))
            new_id, key = self._insert(
                db, old.tier, old.name, old.owner, expires_in, f" rotated-from={old.id}"
            )
            db.execute(
                "UPDATE api_keys SET replaced_by = ?, retires_at = ? WHERE id = ?",
                (new_id, retires_at, old.id),
            )
            self._audit(db, "rotate", old.id, f"replaced-by={new_id} works-until={retires_at}")
        return self.get(new_id), key, self.get(old.id)

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

    def find(self, ref: str) -> ApiKey:
        """The record of a key given as the key itself, its name or its id."""
        return self._resolve(self._connection(), ref)

    def verify(self, token: str) -> ApiKey | None:
        """The record of a presented key, or ``None`` when it is malformed, has a bad checksum,
        is unknown or has the wrong secret.

        Malformed keys and bad checksums are rejected before any database access. A revoked,
        expired or rotated key is returned: ask :meth:`ApiKey.refusal` whether it may be used.
        """
        parts = parse_key(token)
        if parts is None:
            return None
        row = (
            self._connection()
            .execute(f"SELECT {_COLUMNS}, salt, hash FROM api_keys WHERE id = ?", (parts[0],))
            .fetchone()
        )
        if row is None:
            # Spend the same hashing work on unknown ids as on known ones.
            hmac.compare_digest(hash_secret(self._dummy_salt, parts[1]), bytes(32))
            return None
        if not hmac.compare_digest(hash_secret(row[_NCOLUMNS], parts[1]), row[_NCOLUMNS + 1]):
            return None
        return _record(row[:_NCOLUMNS])

    def audit(self, limit: int | None = 50, *, key_id: str | None = None) -> list[AuditRow]:
        """The latest ``limit`` audit entries (all with ``None``), oldest first."""
        where, args = ("WHERE key_id = ?", [key_id]) if key_id is not None else ("", [])
        sql = f"SELECT at, action, key_id, detail FROM audit {where} ORDER BY seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        rows = self._connection().execute(sql, args).fetchall()
        return [AuditRow(*row) for row in reversed(rows)]

    def _resolve(self, db: sqlite3.Connection, ref: str) -> ApiKey:
        """Find a key by the key itself, its name or its id."""
        if ref.startswith(f"{KEY_PREFIX}_"):
            if parse_key(ref) is None:
                raise KeyStoreError(
                    "that is not a well-formed key (wrong length or checksum: was it copied "
                    "whole?); pass the key, its name or its id (see `nnobf keys list`)"
                )
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
    values = list(row)
    values[3] = bool(values[3])
    return ApiKey(*values)
