"""Fashion-MNIST (Zalando, MIT licence) from Debian's ``dataset-fashion-mnist`` package.

The package installs the real data set as gzipped IDX files under
``/usr/share/datasets/fashion-mnist/`` (60,000 train and 10,000 test images, 28x28 grey, 10
classes); ``NNOBF_FASHION_MNIST`` points elsewhere. Nothing downloads.

The demo splits are disjoint and fixed by a seed (stratified by class):

- ``train`` (50,000) and ``pool`` (10,000) from the official train images: the demo model trains
  on ``train``; ``pool`` is what an attacker holds (unlabelled images, a few hundred of them
  labelled), never seen in training;
- ``calibration`` (5,000) and ``test`` (5,000) from the official test images: at 5,000 images
  each, two standard errors of a tier's distance to its target are about 2 points.
"""

from __future__ import annotations

import gzip
import os
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnobfuscator.core.data import Split
from nnobfuscator.zoo.cache import quick

__all__ = [
    "FASHION_CLASSES",
    "FASHION_SPLITS",
    "FashionMNISTMissing",
    "fashion_mnist_available",
    "fashion_mnist_splits",
]

FASHION_CLASSES = [
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
]
#: images per split; train and pool come from the official train images, calibration and test
#: from the official test images
FASHION_SPLITS = {"train": 50_000, "pool": 10_000, "calibration": 5_000, "test": 5_000}
#: quick mode (tests of examples): small splits
QUICK_SPLITS = {"train": 2_000, "pool": 2_000, "calibration": 2_000, "test": 1_000}
_MEAN, _STD = 0.286, 0.353
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class FashionMNISTMissing(ValueError):
    """The Fashion-MNIST files are not on this machine; the message says how to get them."""


def data_dir() -> Path:
    """Where the IDX files are read from (``NNOBF_FASHION_MNIST`` or Debian's folder)."""
    return Path(os.environ.get("NNOBF_FASHION_MNIST") or DEFAULT_DIR)


def fashion_mnist_available() -> bool:
    """Whether all four IDX files are present."""
    folder = data_dir()
    return all((folder / name).is_file() for pair in _FILES.values() for name in pair)


def missing_message() -> str:
    return (
        f"Fashion-MNIST is not installed (looked in {data_dir()}): install Debian's package "
        "with `sudo apt-get install dataset-fashion-mnist` (make demo tries), or set "
        "NNOBF_FASHION_MNIST to a folder holding the four *-idx?-ubyte.gz files"
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _official(part: str) -> tuple[np.ndarray, np.ndarray]:
    """The official ``train`` or ``t10k`` images ``(N, 28, 28)`` uint8 and labels ``(N,)``."""
    if not fashion_mnist_available():
        raise FashionMNISTMissing(missing_message())
    return _read_part(str(data_dir()), part)


@cache
def _read_part(folder_name: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = _FILES[part]
    folder = Path(folder_name)
    images, labels = _read_idx(folder / images_file), _read_idx(folder / labels_file)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise FashionMNISTMissing(f"{folder}: {images_file} and {labels_file} do not match")
    return images, labels


def _stratified(labels: np.ndarray, sizes: list[int], seed: int) -> list[np.ndarray]:
    """Disjoint index sets of the given sizes, each with the classes' shares of ``labels``."""
    from sklearn.model_selection import train_test_split

    rest, parts = np.arange(len(labels)), []
    for size in sizes:
        if size >= len(rest):
            parts.append(rest)
            rest = rest[:0]
            continue
        part, rest = train_test_split(
            rest, train_size=size, stratify=labels[rest], random_state=seed
        )
        parts.append(np.sort(part))
    return parts


def fashion_split_indices(seed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    """Per split: the official part it comes from and its indices there (fixed by ``seed``)."""
    sizes = QUICK_SPLITS if quick() else FASHION_SPLITS
    _, train_labels = _official("train")
    _, test_labels = _official("t10k")
    train, pool = _stratified(train_labels, [sizes["train"], sizes["pool"]], seed)
    calibration, test = _stratified(test_labels, [sizes["calibration"], sizes["test"]], seed)
    return {
        "train": ("train", train),
        "pool": ("train", pool),
        "calibration": ("t10k", calibration),
        "test": ("t10k", test),
    }


def fashion_mnist_splits(image_size: int = 28, seed: int = 0) -> dict[str, Split]:
    """Train / pool / calibration / test splits of Fashion-MNIST (see the module docstring).

    Images are ``(N, 1, image_size, image_size)``, scaled to [0, 1], resized (bilinear) when
    ``image_size`` is not 28, then normalised with the data set's mean and std.

    Raises:
        FashionMNISTMissing: the files are not installed (the message says how to get them).
    """
    splits = {}
    for name, (part, index) in fashion_split_indices(seed).items():
        images, labels = _official(part)
        batch = torch.from_numpy(images[index].astype(np.float32) / 255.0).unsqueeze(1)
        if image_size != 28:
            batch = F.interpolate(batch, size=(image_size, image_size), mode="bilinear")
        batch = (batch - _MEAN) / _STD
        splits[name] = Split(name, batch, torch.from_numpy(labels[index].astype(np.int64)))
    return splits
