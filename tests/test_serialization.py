"""Artifacts: config + safetensors + card; corrupt or mismatched ones fail loudly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_cnn

from nnobfuscator import ArtifactError, TieredModel, __version__, obfuscate


@pytest.fixture
def artifact(tmp_path):
    tiered = obfuscate(
        tiny_cnn(), tiers="free=0.4,pro=0.7,premium=full", key=b"s" * 32, strategy="feature-mix"
    )
    tiered.set_strength("free", "feature-mix", 0.9)
    tiered.set_strength("pro", "feature-mix", 0.4)
    tiered.save_pretrained(str(tmp_path))
    return tmp_path


def test_layout_and_version_stamp(artifact):
    assert sorted(p.name for p in artifact.iterdir()) == [
        "README.md",
        "config.json",
        "tiers.safetensors",
    ]
    config = json.loads((artifact / "config.json").read_text())
    assert config["version"] == __version__
    assert list(config) == sorted(config)
    assert [t["name"] for t in config["tiers"]] == ["free", "pro", "premium"]
    assert "| free | 0.4 |" in (artifact / "README.md").read_text()
    key = b"s" * 32  # the fixture's key: never in a plain-text file of the artifact
    for plain in ("config.json", "README.md"):
        text = (artifact / plain).read_bytes()
        assert key not in text and key.hex().encode() not in text


def test_mismatched_base_model_is_refused(artifact):
    other = tiny_cnn()
    with torch.no_grad():
        other[0].weight.add_(0.01)
    with pytest.raises(ArtifactError, match="does not match the artifact"):
        TieredModel.from_pretrained(str(artifact), other)


def test_corrupt_config_and_tensors(artifact):
    (artifact / "tiers.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="missing or corrupt"):
        TieredModel.from_pretrained(str(artifact), tiny_cnn())
    (artifact / "config.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="invalid JSON"):
        TieredModel.from_pretrained(str(artifact), tiny_cnn())


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="config.json is missing"):
        TieredModel.from_pretrained(str(tmp_path / "nowhere"), tiny_cnn())


def test_unknown_keys_are_ignored_with_a_warning(artifact):
    config = json.loads((artifact / "config.json").read_text())
    config["from_the_future"] = 1
    (artifact / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="from_the_future"):
        TieredModel.from_pretrained(str(artifact), tiny_cnn())


def test_keyed_state_that_re_derives_differently_is_detected(artifact, monkeypatch):
    """Mixing matrices are re-derived from the key on load (a torch with another random generator
    would derive others): the stored fingerprint catches it instead of serving other tiers."""
    from nnobfuscator.strategies import feature_mix

    derive = feature_mix.keyed_block_orthogonal

    def other_generator(*args, **kwargs):
        permutation, blocks = derive(*args, **kwargs)
        return permutation, [block.flip(0) for block in blocks]

    monkeypatch.setattr(feature_mix, "keyed_block_orthogonal", other_generator)
    with pytest.raises(ArtifactError, match="re-derives different keyed state"):
        TieredModel.from_pretrained(str(artifact), tiny_cnn())


def test_loading_onto_an_already_wrapped_model_is_refused(artifact):
    base = tiny_cnn()
    obfuscate(base, tiers="free=0.5,premium=full", strategy="feature-mix")
    with pytest.raises(ValueError, match="already wrapped"):
        TieredModel.from_pretrained(str(artifact), base)


def test_tensors_shared_between_tiers_are_written_as_copies(tmp_path):
    from safetensors.torch import load_file

    from nnobfuscator.serialization import TENSORS_NAME, write_artifact

    shared = torch.arange(4.0)
    write_artifact(
        tmp_path / "a",
        {"model_name": "x"},
        {"free/bn1/mean": shared, "pro/bn1/mean": shared, "pro/bn1/var": shared[:2]},
    )
    loaded = load_file(str(tmp_path / "a" / TENSORS_NAME))
    assert torch.equal(loaded["free/bn1/mean"], shared)
    assert torch.equal(loaded["pro/bn1/mean"], shared)
    assert torch.equal(loaded["pro/bn1/var"], shared[:2])
