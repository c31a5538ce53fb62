"""The SQLite file of API keys: its schema, the migration of older files, connections.

Tables ``api_keys`` (``expires_at``, ``last_used_at``, ``replaced_by`` and ``retires_at`` were
added after the first release: :func:`ensure_schema` adds them in place) and ``audit``, which
triggers keep append-only. Per-day usage counts (``key_usage``) share the file
(:mod:`nnobfuscator.serving.usage`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    tier TEXT,
    owner INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    expires_at TEXT,
    last_used_at TEXT,
    replaced_by TEXT,
    retires_at TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    key_id TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TRIGGER IF NOT EXISTS audit_append_only_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_append_only_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""
#: columns added to ``api_keys`` after the first release: name -> SQL type
_ADDED_COLUMNS = {
    "expires_at": "TEXT",
    "last_used_at": "TEXT",
    "replaced_by": "TEXT",
    "retires_at": "TEXT",
}


def default_keys_path() -> Path:
    """``$NNOBF_HOME/keys.sqlite`` (``~/.cache/nnobfuscator/keys.sqlite`` without NNOBF_HOME)."""
    from nnobfuscator.core.home import cache_dir

    return cache_dir() / "keys.sqlite"


def ensure_schema(db: sqlite3.Connection) -> None:
    """Create the tables and add the columns an older file lacks (in the caller's transaction)."""
    _run_script(db, _SCHEMA)
    have = {row[1] for row in db.execute("PRAGMA table_info(api_keys)")}
    for column, kind in _ADDED_COLUMNS.items():
        if column not in have:
            db.execute(f"ALTER TABLE api_keys ADD COLUMN {column} {kind}")


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """``executescript`` commits first; run the statements one by one inside a transaction."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            db.execute(statement)
            statement = ""


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (explicit transactions), WAL journal, 10 s busy wait."""
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA busy_timeout=10000")
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """An immediate (write-locking) transaction on ``db``: committed at the end of the block,
    rolled back on any exception."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
