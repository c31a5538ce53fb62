"""Sealed bundles: weights shipped to devices that run at the lowest tier until a key unlocks more.

A bundle is one directory, self-contained, with no pickle:

- ``model.safetensors``: a plain state dict whose weights ARE the lowest tier (each strategy's
  change written in: folded weights, the tier's BatchNorm statistics, its class-merge readout as
  the head). ``model.load_state_dict(load_file("model.safetensors"))`` runs it as it is. It holds
  only what the lowest tier runs: the blocks it skips are zeros (they return their input), and
  their weights travel encrypted with the higher tiers (``withheld`` in the manifest). A tier
  that runs at a lower input resolution records its ``input_scale``: resize inputs first.
- ``sealed.safetensors``: per higher tier, the weights of the changed layers at that tier,
  encrypted with AES-256-GCM (one ``uint8`` tensor per tier).
- ``bundle.json``: the model's architecture source, tiers and metrics, digests, and a key check
  value per tier (to tell a wrong key from a tampered file).

Tier keys are derived along a one-way chain from the model's secret key and a random salt:
``S_top = HKDF(model key, salt)``, ``S_lower = HKDF(S_higher)``. The key of tier k carries ``S_k``, so
it yields every lower tier's secret but no higher one. Every encrypted blob is bound (as
associated data) to the digests of ``model.safetensors`` and ``bundle.json``: changing any file of
the bundle makes unsealing fail loudly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save, save_file
from torch import nn

from nnobfuscator.version import __version__

BUNDLE_FORMAT = "nnobfuscator-sealed-bundle"
WEIGHTS_NAME = "model.safetensors"
SEALED_NAME = "sealed.safetensors"
MANIFEST_NAME = "bundle.json"
KEY_PREFIX = "nnobftk"
TIER_KEY_ENV = "NNOBF_TIER_KEY"


class SealError(ValueError):
    """A model cannot be sealed, or a bundle cannot be unsealed (wrong key, tampered file)."""


@dataclass(frozen=True)
class TierKey:
    """A parsed tier key: the tier it unlocks and that tier's chain secret."""

    tier: str
    secret: bytes

    def __str__(self) -> str:
        body = base64.urlsafe_b64encode(self.secret).decode().rstrip("=")
        return f"{KEY_PREFIX}.{self.tier}.{body}.{_checksum(self.tier, body)}"

    @classmethod
    def parse(cls, text: str) -> TierKey:
        """Read a key printed by ``nnobf seal``.

        Raises:
            SealError: not a tier key, or a truncated or mistyped one (checksum mismatch).
        """
        parts = text.strip().split(".")
        if len(parts) != 4 or parts[0] != KEY_PREFIX:
            raise SealError(
                f"not a tier key: tier keys look like {KEY_PREFIX}.<tier>.<secret>.<check>, as "
                "printed by `nnobf seal`"
            )
        _, tier, body, check = parts
        if not hmac.compare_digest(_checksum(tier, body), check):
            raise SealError("the tier key is truncated or mistyped (its checksum does not match)")
        try:
            secret = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise SealError("the tier key is malformed (its secret is not base64)") from None
        if len(secret) != 32:
            raise SealError("the tier key is truncated (its secret is not 32 bytes)")
        return cls(tier, secret)


def _checksum(tier: str, body: str) -> str:
    return hashlib.sha256(f"{tier}.{body}".encode()).hexdigest()[:8]


def _hkdf(secret: bytes, info: str, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info.encode()).derive(secret)


def chain_secrets(model_key: bytes, salt: bytes, tiers: list[str]) -> dict[str, bytes]:
    """Each tier's chain secret, lowest first: the highest from the model key, each lower one a
    one-way function of the one above."""
    secret = _hkdf(model_key, "nnobf-seal/top", salt)
    secrets = {}
    for tier in reversed(tiers):
        secrets[tier] = secret
        secret = _hkdf(secret, "nnobf-seal/down")
    return dict(reversed(list(secrets.items())))


def _lower_secrets(key: TierKey, tiers: list[str]) -> dict[str, bytes]:
    """The secrets ``key`` yields: its own tier's and every lower tier's."""
    found, secret = {}, key.secret
    for tier in reversed(tiers[: tiers.index(key.tier) + 1]):
        found[tier] = secret
        secret = _hkdf(secret, "nnobf-seal/down")
    return found


def _check_value(secret: bytes, bundle_id: str) -> str:
    return hmac.new(secret, f"nnobf-seal/check/{bundle_id}".encode(), "sha256").hexdigest()[:16]


def _cipher(secret: bytes, bundle_id: str, tier: str) -> AESGCM:
    return AESGCM(_hkdf(secret, f"nnobf-seal/encrypt/{tier}", bundle_id.encode()))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _associated_data(bundle_id: str, tier: str, weights: str, manifest: str) -> bytes:
    return f"{bundle_id}/{tier}/{weights}/{manifest}".encode()


# --- sealing ------------------------------------------------------------------------------------
def tier_state_dicts(
    tiered: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The base model's plain state dict; per tier, the tensors that differ from it when the
    plain model runs that tier; and per tier, facts for the manifest (``withheld`` tensors the
    tier does not run, the ``input_scale`` it runs at, the class ``merges`` its head answers).

    Every strategy writes its own change (:meth:`~nnobfuscator.strategies.Strategy.sealed_state`):
    layer strategies fold into weights, block skip zeroes the skipped blocks, class-merge puts its
    readout in the head; BatchNorm layers take the tier's re-estimated statistics.

    Raises:
        SealError: a tier changes the model in a way weights cannot carry (output noise, channel
            slimming), or the model is a pipeline.
    """
    from nnobfuscator.core.wrapping import unwrapped_name
    from nnobfuscator.strategies.bn_reestimate import find_store

    if tiered.task == "text-to-image":
        raise SealError("sealing covers nn.Module models; diffusers pipelines are not supported")
    plain = {
        unwrapped_name(name): tensor.detach().cpu().contiguous()
        for name, tensor in tiered.base_model.state_dict().items()
    }
    store = find_store(tiered.host)
    changed: dict[str, dict[str, torch.Tensor]] = {}
    facts: dict[str, dict[str, Any]] = {}
    for tier in tiered.tier_names:
        state = dict(plain)
        found: dict[str, Any] = {}
        if not tiered.get_tier(tier).is_full:
            for strategy in tiered.strategies.values():
                try:
                    found.update(strategy.sealed_state(tier, state))
                except NotImplementedError as err:
                    raise SealError(
                        f"tier {tier!r}: {err}; seal models calibrated with class-merge, "
                        "feature-mix or weight-noise, and block-skip or input-resolution"
                    ) from None
            for norm, (mean, var) in (store.stats(tier) if store is not None else {}).items():
                state[f"{norm}.running_mean"] = (
                    mean.detach().cpu().to(plain[f"{norm}.running_mean"].dtype)
                )
                state[f"{norm}.running_var"] = (
                    var.detach().cpu().to(plain[f"{norm}.running_var"].dtype)
                )
        changed[tier] = {
            k: v.contiguous()
            for k, v in state.items()
            if v is not plain[k] and not torch.equal(v, plain[k])
        }
        facts[tier] = found
    return plain, changed, facts


@dataclass
class SealResult:
    """What :func:`seal` wrote: the bundle directory and the key of each tier above the lowest."""

    directory: Path
    keys: dict[str, str]
    lowest: str


def seal(tiered: Any, directory: str | Path, *, extra: dict[str, Any] | None = None) -> SealResult:
    """Write a sealed bundle of a calibrated tiered model (see the module doc).

    Args:
        tiered: a calibrated :class:`~nnobfuscator.TieredModel` (class-merge, feature-mix or
            weight-noise; block-skip and input-resolution compute tiers).
        extra: facts stored in ``bundle.json`` (the architecture source, classes, ...).

    Returns:
        The directory and the tier keys (``str``), printed once by ``nnobf seal``: they are not
        stored anywhere.
    """
    tiers = tiered.tier_names
    missing = [t for t in tiers if not tiered.is_calibrated(t)]
    if missing:
        raise SealError(f"tiers {missing} are not calibrated: calibrate before sealing")
    plain, changed, facts = tier_state_dicts(tiered)
    lowest = tiers[0]
    shipped = {**plain, **changed[lowest]}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(shipped, str(directory / WEIGHTS_NAME))
    salt = os.urandom(16)
    bundle_id = hashlib.sha256(salt + _digest(directory / WEIGHTS_NAME).encode()).hexdigest()[:16]
    secrets = chain_secrets(tiered.key, salt, tiers)
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": __version__,
        "bundle_id": bundle_id,
        "model": tiered.model_name,
        "task": tiered.task,
        "lowest_tier": lowest,
        "weights_sha256": _digest(directory / WEIGHTS_NAME),
        "tiers": [
            {
                **tiered.get_tier(name).to_dict(),
                "check": _check_value(secrets[name], bundle_id),
                "sealed_layers": sorted(changed[name]) if name != lowest else [],
                **facts[name],
            }
            for name in tiers
        ],
        "input_spec": tiered.describe()["input_spec"],
        **(extra or {}),
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (directory / MANIFEST_NAME).write_text(text)
    manifest_digest = hashlib.sha256(text.encode()).hexdigest()
    blobs = {}
    for name in tiers[1:]:
        # A higher tier restores every layer the lowest tier changed (to its own weight or back
        # to the original), so unsealing never needs any other tier's material.
        material = {
            layer: changed[name].get(layer, plain[layer]) for layer in changed[lowest]
        } | changed[name]
        nonce = os.urandom(12)
        data = _associated_data(bundle_id, name, manifest["weights_sha256"], manifest_digest)
        ciphertext = _cipher(secrets[name], bundle_id, name).encrypt(nonce, save(material), data)
        blobs[f"tier.{name}"] = torch.frombuffer(bytearray(nonce + ciphertext), dtype=torch.uint8)
    if blobs:
        save_file(blobs, str(directory / SEALED_NAME), metadata={"bundle_id": bundle_id})
    keys = {name: str(TierKey(name, secrets[name])) for name in tiers[1:]}
    return SealResult(directory, keys, lowest)


# --- unsealing ----------------------------------------------------------------------------------
def read_manifest(directory: str | Path) -> dict[str, Any]:
    """A bundle's ``bundle.json``.

    Raises:
        SealError: not a sealed bundle, or a corrupt manifest.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise SealError(f"{directory} is not a sealed bundle: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SealError(f"{path} is corrupt (invalid JSON: {err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise SealError(f"{path} is not an nnobfuscator sealed bundle")
    return manifest


def shipped_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The bundle's plain weights: the lowest tier, usable without any key."""
    try:
        return load_file(str(Path(directory) / WEIGHTS_NAME))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise SealError(f"{directory}/{WEIGHTS_NAME} is missing or corrupt: {err}") from None


def unseal_state_dict(
    directory: str | Path, key: str | TierKey | None, *, tier: str | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of one tier of a bundle, and that tier's name.

    Args:
        key: a tier key (``None``: the lowest tier, no key needed).
        tier: a tier at or below the key's (default: the key's own).

    Raises:
        SealError: a malformed key, a key of another bundle or model, a tier above the key's, or
            a bundle changed after sealing.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    tiers = [t["name"] for t in manifest["tiers"]]
    try:
        shipped = (directory / WEIGHTS_NAME).read_bytes()
        state = load(shipped)  # one read: the bytes checked are the bytes loaded
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise SealError(f"{directory}/{WEIGHTS_NAME} is missing or corrupt: {err}") from None
    if hashlib.sha256(shipped).hexdigest() != manifest["weights_sha256"]:
        raise SealError(
            f"{directory}/{WEIGHTS_NAME} was changed after sealing (its digest differs from "
            f"{MANIFEST_NAME}): the bundle is tampered with or damaged; get a fresh copy"
        )
    if key is None:
        if tier not in (None, tiers[0]):
            raise SealError(f"tier {tier!r} needs its key (or a higher tier's)")
        return state, tiers[0]
    key = key if isinstance(key, TierKey) else TierKey.parse(key)
    if key.tier not in tiers:
        raise SealError(
            f"this key unlocks tier {key.tier!r}, which bundle {manifest['bundle_id']} does not "
            f"have (its tiers: {tiers}): a key of another model?"
        )
    wanted = tier or key.tier
    if wanted not in tiers:
        raise SealError(f"unknown tier {wanted!r}; the bundle's tiers: {tiers}")
    if tiers.index(wanted) > tiers.index(key.tier):
        raise SealError(
            f"a {key.tier!r} key unlocks {key.tier!r} and the tiers below it, not {wanted!r}"
        )
    secrets = _lower_secrets(key, tiers)
    records = {t["name"]: t for t in manifest["tiers"]}
    if not hmac.compare_digest(
        _check_value(secrets[key.tier], manifest["bundle_id"]), records[key.tier]["check"]
    ):
        raise SealError(
            f"this {key.tier!r} key does not belong to bundle {manifest['bundle_id']} (a key "
            "of another seal of the model, or of another model)"
        )
    if wanted == tiers[0]:
        return state, wanted
    blob = _sealed_blob(directory, wanted)
    data = _associated_data(
        manifest["bundle_id"],
        wanted,
        manifest["weights_sha256"],
        hashlib.sha256((directory / MANIFEST_NAME).read_bytes()).hexdigest(),
    )
    try:
        material = _cipher(secrets[wanted], manifest["bundle_id"], wanted).decrypt(
            blob[:12], blob[12:], data
        )
    except InvalidTag:
        raise SealError(
            f"{directory} was changed after sealing ({MANIFEST_NAME} or {SEALED_NAME} does not "
            "authenticate): the bundle is tampered with or damaged; get a fresh copy"
        ) from None
    state.update(load(material))
    return state, wanted


def _sealed_blob(directory: Path, tier: str) -> bytes:
    try:
        blobs = load_file(str(directory / SEALED_NAME))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise SealError(f"{directory}/{SEALED_NAME} is missing or corrupt: {err}") from None
    if f"tier.{tier}" not in blobs:
        raise SealError(f"{directory}/{SEALED_NAME} holds no material for tier {tier!r}")
    return blobs[f"tier.{tier}"].numpy().tobytes()


def unseal(
    directory: str | Path,
    model: nn.Module,
    key: str | TierKey | None = None,
    *,
    tier: str | None = None,
) -> nn.Module:
    """Load one tier of a sealed bundle into ``model`` (its architecture, any weights); returns
    it in eval mode. Without a key it runs at the lowest tier.

    Example:
        >>> model = unseal("bundle", resnet18(num_classes=10), key=os.environ["NNOBF_TIER_KEY"])
    """
    state, _ = unseal_state_dict(directory, key, tier=tier)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise SealError(
            f"the bundle's weights do not fit this model: {str(err).splitlines()[0]}"
        ) from None
    return model.eval()
