"""The text of an API key: its format, checksum and parsing, and the names and durations that
``nnobf keys`` reads. Nothing here touches the key database (:mod:`~nnobfuscator.serving.api_keys`).

Key format:
    ``nnobf_<id>_<secret><check>``, for example ``nnobf_1a2b3c4d5e6f_<30 base62 chars><6 chars>``:

    * ``nnobf_`` is a fixed prefix, so secret scanners (and people) recognise a leaked key;
    * ``id`` (12 lowercase hex digits) is the public handle used to find the row; ``nnobf_<id>_…``
      (the *stub*) is safe to log and display;
    * ``secret`` (30 base62 characters, about 178 bits) is never stored: only
      ``sha256(salt || secret)``, compared in constant time;
    * ``check`` is the CRC32 of everything before it, written as 6 base62 digits (like GitHub's
      tokens). :func:`parse_key` checks prefix, shape and checksum before any database lookup, so
      a mistyped or made-up key costs no query.

    Keys made before the checksum (``nnobf_<id>_<43 url-safe characters>``) keep working: they
    have their own exact shape, are still looked up and checked against their stored hash, and
    keep their expiry, revocation and rotation like any key. Rotate them to get the new format.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import zlib
from datetime import timedelta

KEY_PREFIX = "nnobf"
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
ID_LENGTH = 12
SECRET_LENGTH = 30
CHECK_LENGTH = 6
_KEY_PATTERN = re.compile(
    rf"^{KEY_PREFIX}_([0-9a-f]{{{ID_LENGTH}}})_([0-9A-Za-z]{{{SECRET_LENGTH}}})"
    rf"([0-9A-Za-z]{{{CHECK_LENGTH}}})$"
)
# Keys created before the checksum: token_hex(6) id, token_urlsafe(32) secret.
_LEGACY_PATTERN = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{43}})$")
_TIER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DURATION_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)\s*$")
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


class KeyStoreError(ValueError):
    """A key store operation got a bad argument (unknown key, bad tier name, duplicate name)."""


def hash_secret(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, digit = divmod(number, 62)
        digits.append(BASE62[digit])
    return "".join(reversed(digits)).rjust(width, BASE62[0])


def key_checksum(body: str) -> str:
    """The 6 base62 digits of CRC32(``body``) that end a key whose text before them is ``body``."""
    return base62(zlib.crc32(body.encode()), CHECK_LENGTH)


def key_stub(key_id: str) -> str:
    """``nnobf_<id>_…``: a key shown without its secret."""
    return f"{KEY_PREFIX}_{key_id}_…"


def parse_key(token: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed key with a valid checksum, else ``None``.

    Needs no database: this is the check that runs before any lookup. Keys of the old format
    (no checksum, see the module docstring) are recognised by their exact shape.
    """
    if not isinstance(token, str):
        return None
    match = _KEY_PATTERN.match(token)
    if match is not None:
        key_id, secret, check = match.groups()
        body = token[:-CHECK_LENGTH]
        return (key_id, secret) if hmac.compare_digest(check, key_checksum(body)) else None
    legacy = _LEGACY_PATTERN.match(token)
    return (legacy.group(1), legacy.group(2)) if legacy is not None else None


def new_key() -> tuple[str, str, str]:
    """A fresh ``(id, secret, key)``."""
    key_id = secrets.token_hex(ID_LENGTH // 2)
    secret = "".join(secrets.choice(BASE62) for _ in range(SECRET_LENGTH))
    body = f"{KEY_PREFIX}_{key_id}_{secret}"
    return key_id, secret, body + key_checksum(body)


def parse_duration(text: str) -> timedelta | None:
    """``"30d"``, ``"12h"``, ``"15m"``/``"15min"``, ``"90s"`` or ``"0"``; ``"never"`` gives ``None``.

    Raises:
        KeyStoreError: anything else.
    """
    value = text.strip().lower()
    if value in {"never", "none"}:
        return None
    if value == "0":
        return timedelta(0)
    match = _DURATION_PATTERN.match(value)
    if match is None:
        raise KeyStoreError(
            f"invalid duration {text!r}: use a number and a unit (s, m or min, h, d), e.g. "
            "'30d' or '24h', or 'never'"
        )
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def check_tier_name(tier: str) -> str:
    """Return ``tier`` if it is a valid tier name, else raise :class:`KeyStoreError`."""
    if not isinstance(tier, str) or not _TIER_PATTERN.match(tier):
        raise KeyStoreError(
            f"invalid tier name {tier!r}: use letters, digits, '_', '-' or '.' (e.g. 'pro')"
        )
    return tier
