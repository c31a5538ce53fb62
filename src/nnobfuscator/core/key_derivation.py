"""Every random choice of a tiered model derives from its secret key.

Derivation is HMAC-SHA256 over a label, so the same key and label always give the same stream and
different labels (layer names, tiers, inputs) give independent ones.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import torch

KEY_BYTES = 32


def new_key() -> bytes:
    """A fresh random 256-bit secret key."""
    return secrets.token_bytes(KEY_BYTES)


def coerce_key(key: bytes | str | None) -> bytes:
    """Accept raw bytes, a hex string or ``None`` (a new random key).

    Raises:
        ValueError: a string that is not hex or a key shorter than 16 bytes.
    """
    if key is None:
        return new_key()
    if isinstance(key, str):
        try:
            key = bytes.fromhex(key)
        except ValueError:
            raise ValueError("the secret key must be given as bytes or a hex string") from None
    if len(key) < 16:
        raise ValueError(f"the secret key is {len(key)} bytes; use at least 16 (32 recommended)")
    return bytes(key)


def key_id(key: bytes) -> str:
    """A public fingerprint of the key (safe to print and store)."""
    return hashlib.sha256(b"nnobfuscator-key-id" + key).hexdigest()[:16]


def derive_seed(key: bytes, *labels: str | bytes) -> int:
    """A 63-bit seed derived from the key and labels."""
    message = b"\x00".join(
        label if isinstance(label, bytes) else label.encode() for label in labels
    )
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keyed_generator(key: bytes, *labels: str | bytes) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from the key and labels."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(key, *labels))
    return generator


def keyed_orthogonal(key: bytes, size: int, *labels: str) -> torch.Tensor:
    """A keyed random orthogonal ``size x size`` matrix (Haar distributed, via QR)."""
    generator = keyed_generator(key, "orthogonal", str(size), *labels)
    gaussian = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(torch.float32)


def keyed_normal(key: bytes, shape: tuple[int, ...], *labels: str) -> torch.Tensor:
    """Keyed standard normal noise of the given shape."""
    return torch.randn(shape, generator=keyed_generator(key, "normal", *labels))


MIX_BLOCK = 256


def keyed_permutation(key: bytes, size: int, *labels: str) -> torch.Tensor:
    """A keyed random permutation of ``range(size)``."""
    return torch.randperm(size, generator=keyed_generator(key, "permutation", str(size), *labels))


def keyed_block_orthogonal(
    key: bytes, size: int, *labels: str, block: int = MIX_BLOCK
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A keyed orthogonal map on ``size`` features that is cheap at any size.

    The features are permuted by a keyed permutation, then cut into consecutive groups of at most
    ``block`` (near-equal sizes), each mixed by its own keyed Haar-random orthogonal matrix. Up to
    ``block`` features this is a dense Haar orthogonal; above, it stays orthogonal and costs
    ``size * block`` instead of ``size**2``.

    Returns:
        The permutation and the orthogonal blocks (in order).
    """
    permutation = keyed_permutation(key, size, *labels)
    count = -(-size // block)
    sizes = [size // count + (1 if i < size % count else 0) for i in range(count)]
    blocks = [keyed_orthogonal(key, n, *labels, f"block{i}") for i, n in enumerate(sizes)]
    return permutation, blocks
