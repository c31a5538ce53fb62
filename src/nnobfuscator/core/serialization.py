"""Artifact directories: ``config.json`` + ``tiers.safetensors`` + ``README.md``. Never pickle.

This module knows the file format only; ``TieredModel.save_pretrained`` / ``from_pretrained`` say
what goes in. The secret key is never written here in plain (see
``nnobfuscator.core.secret_key``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nnobfuscator.core.preprocessing import DatasetFacts, class_names, preprocessing
from nnobfuscator.version import __version__

FORMAT = "nnobfuscator-tiered-model"
CONFIG_NAME = "config.json"
TENSORS_NAME = "tiers.safetensors"
CARD_NAME = "README.md"
#: feature-mix options of artifacts saved before mixing blocks (0.3 and earlier)
LEGACY_FEATURE_MIX = {"block": 256, "permute": True}
#: the demo zoo's data sets as they were when artifacts began to carry their preprocessing
#: (frozen: an upgrade restores what the artifact was calibrated with, whatever the zoo is now)
LEGACY_DATASETS = {
    "fashion-mnist": DatasetFacts(
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        0.286,
        0.353,
    ),
    "digits": DatasetFacts(tuple(str(i) for i in range(10)), 0.30, 0.38),
    "digit-scenes": DatasetFacts(("background", *(str(i) for i in range(10))), 0.12, 0.235),
}
_KNOWN_KEYS = {
    "format",
    "version",
    "task",
    "model",
    "input_spec",
    "strategies",
    "tiers",
    "key_id",
    "base_fingerprint",
    "meta",
}


class ArtifactError(ValueError):
    """An artifact directory is missing, corrupt or does not match the given base model."""


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with no two sharing memory (safetensors refuses shared storage; two tiers
    may hold the very same statistics): later sharers are copied."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        out[name] = tensor.clone() if key in seen and tensor.numel() else tensor
        seen.add(key)
    return out


def write_artifact(
    directory: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> Path:
    """Write ``config`` (stamped with format and version), ``tensors`` and a card to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**config, "format": FORMAT, "version": __version__}
    tensors = _unshared({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    # Write to temporary names first, so a crash never leaves a half-written artifact behind.
    _atomic_write(directory / TENSORS_NAME, lambda p: save_file(tensors, str(p)))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(text))
    _atomic_write(directory / CARD_NAME, lambda p: p.write_text(model_card(config)))
    return directory


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def read_config(directory: str | Path) -> dict[str, Any]:
    """Read and check an artifact's ``config.json``.

    Raises:
        ArtifactError: missing directory or file, invalid JSON, or not an nnobfuscator artifact.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{directory} is not a tiered-model artifact: {CONFIG_NAME} is missing "
            "(create one with TieredModel.save_pretrained or `nnobf demo --out DIR`)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is corrupt (invalid JSON: {err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an nnobfuscator artifact (format field missing)")
    config = upgrade(config, directory)
    unknown = sorted(set(config) - _KNOWN_KEYS)
    if unknown:
        warnings.warn(
            f"{path}: ignoring unknown keys {unknown} (written by nnobfuscator "
            f"{config.get('version')}, this is {__version__})",
            stacklevel=2,
        )
    return config


def upgrade(config: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """Bring an older artifact's config up to what this version reads.

    - 0.1 artifacts: refused (their keyed mixing is no longer derived).
    - feature-mix saved before mixing blocks: the legacy block of 256 features, permuted.
    - image models saved before artifacts carried their preprocessing: ``meta["preprocessing"]``
      and ``meta["classes"]`` from the recorded data source.

    Raises:
        ArtifactError: an artifact this version cannot read.
    """
    version = str(config.get("version", ""))
    if version.startswith("0.1."):
        raise ArtifactError(
            f"{directory} was written by nnobfuscator {version}, whose keyed mixing this version "
            "no longer derives: calibrate the model again (nnobf calibrate)"
        )
    config = dict(config)
    strategies = []
    for saved in config.get("strategies", []):
        if saved.get("name") == "feature-mix" and "block" not in saved:
            saved = {**saved, **LEGACY_FEATURE_MIX}
        strategies.append(saved)
    config["strategies"] = strategies
    meta = dict(config.get("meta") or {})
    data = (meta.get("source") or {}).get("data")
    spec = config.get("input_spec") or {}
    if data and spec and "preprocessing" not in meta:
        size = (spec["height"], spec["width"]) if spec.get("height") and spec.get("width") else None
        meta["preprocessing"] = preprocessing(
            data,
            LEGACY_DATASETS,
            channels=spec.get("channels"),
            size=size,
            task=str(config.get("task")),
        )
        if "classes" not in meta and (classes := class_names(data, LEGACY_DATASETS)):
            meta["classes"] = classes
    config["meta"] = meta
    return config


def read_artifact(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An artifact's config and tensors.

    Raises:
        ArtifactError: a missing or corrupt file.
    """
    config = read_config(directory)
    try:
        tensors = load_file(str(Path(directory) / TENSORS_NAME))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise ArtifactError(f"{directory}/{TENSORS_NAME} is missing or corrupt: {err}") from None
    return config, tensors


def model_card(config: dict[str, Any]) -> str:
    """A short Markdown card with the tier table."""
    strategies = "+".join(s["name"] for s in config.get("strategies", [])) or "none"
    lines = [
        f"# Tiered {config.get('model', 'model')} ({config.get('task')})",
        "",
        f"Made with nnobfuscator {__version__}. Strategy: {strategies}. "
        f"Key id: `{config.get('key_id')}`. Load with "
        "`TieredModel.from_pretrained(dir, base_model)`.",
        "",
        "| tier | target | achieved (calibration) | achieved (test) | relative cost | params |",
        "|---|---|---|---|---|---|",
    ]
    for tier in config.get("tiers", []):
        metrics = tier.get("metrics", {})
        params = json.dumps(tier["params"], sort_keys=True) if tier.get("params") else "-"
        lines.append(
            f"| {tier['name']} | {tier['target']} | {_pct(metrics.get('calibration'))} | "
            f"{_pct(metrics.get('test'))} | {tier.get('relative_cost', 1.0):.3f} | {params} |"
        )
    return "\n".join(lines) + (
        "\n\nThe secret key is not stored here in plain: it stays in the key ring of the machine "
        "that calibrated the model, in `NNOBF_MODEL_KEY`, or encrypted in `key.enc.json` under a "
        "passphrase.\n"
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
