"""Artifact directories: ``config.json`` + ``tiers.safetensors`` + ``README.md``. Never pickle.

The artifact holds the secret key (it is what a server needs to reproduce every tier): keep it
where the weights are kept.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nnobfuscator.model import InputSpec, TieredModel, model_fingerprint
from nnobfuscator.security.keys import key_id
from nnobfuscator.tiers import Tier
from nnobfuscator.version import __version__

FORMAT = "nnobfuscator-tiered-model"
CONFIG_NAME = "config.json"
TENSORS_NAME = "tiers.safetensors"
CARD_NAME = "README.md"
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


def save_tiered(model: TieredModel, directory: str | Path) -> Path:
    """Write ``model``'s tiers, strategies and key to ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "version": __version__,
        "task": model.task,
        "model": model.model_name,
        "input_spec": asdict(model.input_spec) if model.input_spec else None,
        "strategies": [
            {**strategy.config(), "fingerprint": strategy.fingerprint()}
            for strategy in model.strategies.values()
        ],
        "tiers": [tier.to_dict() for tier in model.tiers.values()],
        "key_id": key_id(model.key),
        "base_fingerprint": model.base_fingerprint,
        "meta": model.meta,
    }
    tensors: dict[str, torch.Tensor] = {"key": torch.tensor(list(model.key), dtype=torch.uint8)}
    for strategy in model.strategies.values():
        tensors.update({k: v.contiguous().cpu() for k, v in strategy.state_tensors().items()})
    # Write to temporary names first, so a crash never leaves a half-written artifact behind.
    _atomic_write(directory / TENSORS_NAME, lambda p: save_file(tensors, str(p)))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(text))
    _atomic_write(directory / CARD_NAME, lambda p: p.write_text(model_card(model)))
    return directory


def _atomic_write(path: Path, write) -> None:
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
    unknown = sorted(set(config) - _KNOWN_KEYS)
    if unknown:
        warnings.warn(
            f"{path}: ignoring unknown keys {unknown} (written by nnobfuscator "
            f"{config.get('version')}, this is {__version__})",
            stacklevel=2,
        )
    return config


def load_tiered(
    directory: str | Path, base_model: nn.Module, *, check_base: bool = True
) -> TieredModel:
    """Rebuild a :class:`TieredModel` from ``directory`` on top of ``base_model``.

    Raises:
        ArtifactError: corrupt files, a different base model (when ``check_base``), or keyed state
            that does not re-derive identically.
    """
    config = read_config(directory)
    fingerprint = model_fingerprint(base_model)
    if check_base and fingerprint != config["base_fingerprint"]:
        raise ArtifactError(
            f"the base model does not match the artifact {directory}: its weights fingerprint is "
            f"{fingerprint}, the artifact was calibrated on {config['base_fingerprint']}. Load the "
            "same trained weights (or pass check_base=False if you know what you are doing)."
        )
    try:
        tensors = load_file(str(Path(directory) / TENSORS_NAME))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise ArtifactError(f"{directory}/{TENSORS_NAME} is missing or corrupt: {err}") from None
    key = bytes(tensors["key"].tolist())
    if key_id(key) != config.get("key_id"):
        raise ArtifactError(f"{directory}: the stored key does not match the config's key_id")
    spec = config.get("input_spec")
    model = TieredModel(
        base_model,
        [Tier.from_dict(t) for t in config["tiers"]],
        [{"name": s["name"], "targets": s["targets"]} for s in config["strategies"]],
        key,
        task=config["task"],
        model_name=config.get("model", "model"),
        input_spec=InputSpec(**spec) if spec else None,
        meta=config.get("meta", {}),
        base_fingerprint=fingerprint,
    )
    for saved in config["strategies"]:
        strategy = model.strategies[saved["name"]]
        strategy.load_state_tensors(tensors)
        if strategy.fingerprint() != saved["fingerprint"]:
            raise ArtifactError(
                f"{directory}: strategy {saved['name']!r} re-derives different keyed state "
                "(corrupt tensors, or a torch version with another random generator)"
            )
    return model


def model_card(model: TieredModel) -> str:
    """A short Markdown card with the tier table."""
    lines = [
        f"# Tiered {model.model_name} ({model.task})",
        "",
        f"Made with nnobfuscator {__version__}. Strategy: {'+'.join(model.strategies) or 'none'}. "
        f"Key id: `{key_id(model.key)}`. Load with "
        "`TieredModel.from_pretrained(dir, base_model)`.",
        "",
        "| tier | target | achieved (calibration) | achieved (test) | relative cost | params |",
        "|---|---|---|---|---|---|",
    ]
    for tier in model.tiers.values():
        metrics = tier.metrics
        params = json.dumps(tier.params, sort_keys=True) if tier.params else "-"
        lines.append(
            f"| {tier.name} | {tier.target.spec} | {_pct(metrics.get('calibration'))} | "
            f"{_pct(metrics.get('test'))} | {tier.relative_cost:.3f} | {params} |"
        )
    return "\n".join(lines) + "\n\nThis directory contains the secret key: keep it private.\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
