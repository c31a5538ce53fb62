"""Fashion-MNIST from Debian's dataset-fashion-mnist: disjoint, stratified splits; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from nnobfuscator.cli import app
from nnobfuscator.zoo.fashion import (
    FASHION_SPLITS,
    FashionMNISTMissing,
    fashion_mnist_available,
    fashion_mnist_splits,
    fashion_split_indices,
    missing_message,
)

needs_data = pytest.mark.skipif(not fashion_mnist_available(), reason=missing_message())


@needs_data
def test_splits_are_disjoint_stratified_and_sized() -> None:
    found = fashion_split_indices()
    assert {name: len(index) for name, (_, index) in found.items()} == FASHION_SPLITS
    by_part: dict[str, list[np.ndarray]] = {}
    for part, index in found.values():
        by_part.setdefault(part, []).append(index)
    for parts in by_part.values():
        together = np.concatenate(parts)
        assert len(np.unique(together)) == len(together)  # no image in two splits
    splits = fashion_mnist_splits()
    for name, split in splits.items():
        counts = np.bincount(split.labels.numpy(), minlength=10)
        assert counts.max() - counts.min() <= 1, name  # the classes' shares are kept
        assert tuple(split.images.shape[1:]) == (1, 28, 28)
    assert abs(float(splits["train"].images.mean())) < 0.05  # normalised
    assert tuple(fashion_mnist_splits(image_size=32)["test"].images.shape[1:]) == (1, 32, 32)


def test_missing_data_says_how_to_install_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NNOBF_FASHION_MNIST", str(tmp_path))
    assert not fashion_mnist_available()
    with pytest.raises(FashionMNISTMissing, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_splits()
    result = CliRunner().invoke(app, ["demo", "--data", "fashion-mnist", "--quiet"])
    assert result.exit_code == 2
    assert "dataset-fashion-mnist" in result.output
    result = CliRunner().invoke(app, ["demo", "--model", "vgg16", "--data", "fashion-mnist"])
    assert result.exit_code == 2 and "trains on digits" in result.output
