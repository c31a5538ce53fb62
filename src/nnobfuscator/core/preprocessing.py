"""How an uploaded image becomes a model's input: the ``meta["preprocessing"]`` an artifact
carries, made from the data source it was calibrated on.

The facts of named data sets (a demo zoo's) come in as a mapping (:class:`DatasetFacts` by
name), so this module knows no data set: ``jobs.sources`` passes the zoo's, and the upgrade of
old artifacts passes the ones the zoo had when artifacts began to carry their preprocessing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class DatasetFacts:
    """Class names (by index) and the single-channel normalisation ``(x - mean) / std``."""

    classes: tuple[str, ...]
    mean: float
    std: float


def preprocessing(
    data: Mapping[str, Any],
    datasets: Mapping[str, DatasetFacts],
    *,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    task: str = "classification",
) -> dict[str, Any]:
    """How an uploaded image becomes one input of a model calibrated on ``data``, stored in the
    artifact (``meta["preprocessing"]``) so that serving needs no data source.

    Args:
        data: the data source (``{"zoo": name}`` or folders, with optional ``image_size``,
            ``grayscale``, ``mean``, ``std``).
        datasets: facts of the data sets a ``zoo`` source may name.
        channels, size: what the model takes (its input check), when known.

    Returns:
        ``channels``, ``size`` (``[height, width]`` or ``None``: the image's own), per-channel
        ``mean`` and ``std``, and ``crop`` (resize the shorter side and centre-crop, ImageFolder
        style, instead of stretching).
    """
    if size is None and data.get("image_size"):
        size = (int(data["image_size"]), int(data["image_size"]))
    channels = channels or (1 if data.get("grayscale") else 3)
    facts = datasets.get(data["zoo"]) if "zoo" in data else None
    if facts is not None:  # stretched to size, normalised with the data set's own statistics
        return {
            "channels": channels,
            "size": list(size) if size else None,
            "mean": [facts.mean] * channels,
            "std": [facts.std] * channels,
            "crop": False,
        }
    mean, std = list(data.get("mean", IMAGENET_MEAN)), list(data.get("std", IMAGENET_STD))
    if channels == 1 and len(mean) == 3:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return {
        "channels": channels,
        "size": list(size) if size else None,
        "mean": mean,
        "std": std,
        "crop": task == "classification",
    }


def class_names(data: Mapping[str, Any], datasets: Mapping[str, DatasetFacts]) -> list[str] | None:
    """Class names by index of a data source: a named data set's, or an ImageFolder's folders."""
    if "zoo" in data:
        facts = datasets.get(data["zoo"])
        return list(facts.classes) if facts is not None else None
    folder = data.get("calibration")
    if folder and Path(folder).is_dir() and not (Path(folder) / "masks").is_dir():
        return sorted(entry.name for entry in Path(folder).iterdir() if entry.is_dir()) or None
    return None
