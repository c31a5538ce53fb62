"""Where a tiered model's secret key lives: never in the artifact in plain.

An artifact directory can be copied, uploaded or attached to a ticket; its secret key must not
travel with it by accident. The key is looked up, in this order, from:

1. ``key=`` given to :meth:`TieredModel.from_pretrained`;
2. the environment variable ``NNOBF_MODEL_KEY`` (hex; for containers and CI secrets);
3. this machine's key ring, ``$NNOBF_HOME/model-keys/<key id>.key`` (mode 0600, outside any
   artifact; written by ``save_pretrained``, like an SSH key);
4. ``key.enc.json`` inside the artifact: the key encrypted under a passphrase (scrypt, then
   AES-256-GCM), written when ``save_pretrained`` gets a passphrase or ``NNOBF_PASSPHRASE`` is set,
   and opened with the same passphrase: the way to move an artifact to another server.
"""

from __future__ import annotations

import base64
import json
import os
import warnings
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from nnobfuscator.core.home import cache_dir
from nnobfuscator.core.key_derivation import coerce_key, key_id

KEY_ENV = "NNOBF_MODEL_KEY"
PASSPHRASE_ENV = "NNOBF_PASSPHRASE"
ENCRYPTED_KEY_NAME = "key.enc.json"
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}


class KeyNotFoundError(ValueError):
    """No source holds the secret key an artifact was calibrated with."""


def key_ring() -> Path:
    """This machine's key ring directory (created private on first use)."""
    path = cache_dir() / "model-keys"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def remember_key(key: bytes) -> Path:
    """Put ``key`` in this machine's key ring (file mode 0600); returns its path."""
    path = key_ring() / f"{key_id(key)}.key"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(key.hex() + "\n")
        tmp.replace(path)
    return path


def encrypt_key(key: bytes, passphrase: str) -> dict[str, object]:
    """``key`` encrypted under ``passphrase`` (scrypt key derivation, AES-256-GCM)."""
    if not passphrase:
        raise ValueError("an empty passphrase protects nothing; give a real one")
    salt, nonce = os.urandom(16), os.urandom(12)
    wrapping = Scrypt(salt=salt, length=32, **_SCRYPT).derive(passphrase.encode())
    identity = key_id(key)
    sealed = AESGCM(wrapping).encrypt(nonce, key, identity.encode())
    encode = base64.b64encode
    return {
        "kdf": {"name": "scrypt", **_SCRYPT, "salt": encode(salt).decode()},
        "cipher": "AES-256-GCM",
        "nonce": encode(nonce).decode(),
        "ciphertext": encode(sealed).decode(),
        "key_id": identity,
    }


def decrypt_key(record: dict[str, object], passphrase: str) -> bytes:
    """The key in an :func:`encrypt_key` record.

    Raises:
        KeyNotFoundError: a wrong passphrase or a changed record.
    """
    kdf = record["kdf"]
    assert isinstance(kdf, dict)
    salt = base64.b64decode(str(kdf["salt"]))
    wrapping = Scrypt(salt=salt, length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(
        passphrase.encode()
    )
    try:
        return AESGCM(wrapping).decrypt(
            base64.b64decode(str(record["nonce"])),
            base64.b64decode(str(record["ciphertext"])),
            str(record["key_id"]).encode(),
        )
    except InvalidTag:
        raise KeyNotFoundError(
            f"the passphrase does not open {ENCRYPTED_KEY_NAME} (wrong passphrase, or the file "
            "was changed)"
        ) from None


def store_key(key: bytes, directory: Path, passphrase: str | None = None) -> list[str]:
    """Keep ``key`` out of the artifact at ``directory``: in the key ring, and encrypted in the
    artifact when a passphrase is given (or ``NNOBF_PASSPHRASE`` is set). Returns where it went."""
    places = [str(remember_key(key))]
    passphrase = passphrase or os.environ.get(PASSPHRASE_ENV)
    if passphrase:
        path = directory / ENCRYPTED_KEY_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(encrypt_key(key, passphrase), indent=2) + "\n")
        tmp.replace(path)
        places.append(str(path))
    return places


def find_key(
    directory: Path,
    wanted_id: str,
    *,
    key: bytes | str | None = None,
    passphrase: str | None = None,
    legacy: bytes | None = None,
) -> bytes:
    """The secret key whose id is ``wanted_id``, from the first source that has it (module doc).

    Args:
        legacy: a key stored in plain by an older version (used with a warning).

    Raises:
        KeyNotFoundError: a given key of another model, or no source holds the key.
    """
    if key is not None:
        return _check(coerce_key(key), wanted_id, "the key given")
    if os.environ.get(KEY_ENV):
        return _check(coerce_key(os.environ[KEY_ENV]), wanted_id, f"${KEY_ENV}")
    ring = key_ring() / f"{wanted_id}.key"
    if ring.is_file():
        return _check(coerce_key(ring.read_text().strip()), wanted_id, str(ring))
    encrypted = directory / ENCRYPTED_KEY_NAME
    passphrase = passphrase or os.environ.get(PASSPHRASE_ENV)
    if encrypted.is_file() and passphrase:
        record = json.loads(encrypted.read_text())
        return _check(decrypt_key(record, passphrase), wanted_id, str(encrypted))
    if legacy is not None:
        warnings.warn(
            f"{directory} holds its secret key in plain (written by an older nnobfuscator): "
            "save it again with save_pretrained to move the key out of the artifact",
            stacklevel=3,
        )
        return _check(legacy, wanted_id, "the artifact")
    hint = (
        f"; {encrypted.name} is there: set {PASSPHRASE_ENV} or pass passphrase="
        if encrypted.is_file()
        else ""
    )
    raise KeyNotFoundError(
        f"no secret key for {directory} (key id {wanted_id}): the artifact does not hold it in "
        f"plain. Pass key=..., set {KEY_ENV} to the key in hex, or copy the key file "
        f"{wanted_id}.key into {key_ring()}{hint}"
    )


def _check(key: bytes, wanted_id: str, where: str) -> bytes:
    if key_id(key) != wanted_id:
        raise KeyNotFoundError(
            f"{where} is the key of another model (key id {key_id(key)}); this artifact needs "
            f"key id {wanted_id}"
        )
    return key
