"""Offline demo data and models."""

from __future__ import annotations

import torch

from nnobfuscator.zoo import build_classifier, digits_splits, load_zoo_classifier


def test_digits_splits_are_fixed_disjoint_and_complete():
    first, second = digits_splits(8), digits_splits(8)
    assert {k: len(v) for k, v in first.items()} == {"train": 900, "calibration": 448, "test": 449}
    for name in first:
        assert torch.equal(first[name].images, second[name].images)
    # the 1,797 digits are distinct images: a sample in two splits would shrink the set
    rows = {tuple(img.flatten().tolist()) for split in first.values() for img in split.images}
    assert len(rows) == sum(len(split) for split in first.values()) == 1797
    assert digits_splits(16)["test"].images.shape[1:] == (1, 16, 16)


def test_demo_architectures_accept_their_input_size():
    for name, size in (("resnet18", 16), ("vgg16", 32)):
        model = build_classifier(name).eval()
        with torch.inference_mode():
            assert model(torch.zeros(2, 1, size, size)).shape == (2, 10)


def test_zoo_model_is_trained_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NNOBF_HOME", str(tmp_path))
    model, info = load_zoo_classifier("resnet18", dataset="digits", epochs=1, progress=False)
    assert info["epochs"] == 1 and 0.0 <= info["test_accuracy"] <= 1.0
    assert info["recipe"]["epochs"] == 1 and info["recipe"]["seed"] == 0
    cached = list(tmp_path.glob("resnet18-digits-*.*"))
    assert sorted(p.suffix for p in cached) == [".json", ".safetensors"]
    again, info_again = load_zoo_classifier("resnet18", dataset="digits", epochs=1, progress=False)
    assert info_again == info
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_training_from_scratch_is_reproducible(tmp_path, monkeypatch):
    """The same recipe trains the same weights (seeded, fixed thread count), cache or not."""
    monkeypatch.setenv("NNOBF_HOME", str(tmp_path))
    first, info = load_zoo_classifier("resnet18", dataset="digits", epochs=1, progress=False)
    torch.set_num_threads(1)  # the caller's thread count does not matter
    try:
        second, info_again = load_zoo_classifier(
            "resnet18", dataset="digits", epochs=1, progress=False, retrain=True
        )
    finally:
        torch.set_num_threads(2)
    assert info_again["test_accuracy"] == info["test_accuracy"]
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
