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

    from nnobfuscator.core.serialization import TENSORS_NAME, write_artifact

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


def test_artifacts_written_before_they_carried_preprocessing_are_upgraded_on_read(artifact):
    """An artifact that only names its data source gains its preprocessing and class names."""
    from nnobfuscator.core.serialization import read_config, upgrade
    from nnobfuscator.zoo.fashion import FASHION_CLASSES

    path = artifact / "config.json"
    config = json.loads(path.read_text())
    config["input_spec"] = {"channels": 1, "height": 28, "width": 28}
    config["meta"] = {"source": {"data": {"zoo": "fashion-mnist", "image_size": 28}}}
    path.write_text(json.dumps(config))
    meta = read_config(artifact)["meta"]
    assert meta["preprocessing"]["size"] == [28, 28] and meta["preprocessing"]["crop"] is False
    assert meta["preprocessing"]["channels"] == 1 and len(meta["preprocessing"]["mean"]) == 1
    assert meta["classes"] == list(FASHION_CLASSES)
    folder = upgrade(
        {
            **config,
            "input_spec": {"channels": 3, "height": 64, "width": 64},
            "meta": {"source": {"data": {"calibration": "cal", "image_size": 64}}},
        },
        artifact,
    )["meta"]["preprocessing"]
    assert folder["crop"] is True and folder["mean"] == [0.485, 0.456, 0.406]
    with pytest.raises(ArtifactError, match="calibrate the model again"):
        upgrade({**config, "version": "0.1.3"}, artifact)


def test_serving_reads_the_artifact_and_never_imports_the_zoo(artifact):
    import subprocess
    import sys

    from nnobfuscator.serving.served_model import serve_model

    tiered = TieredModel.from_pretrained(str(artifact), tiny_cnn())
    tiered.meta["preprocessing"] = {
        "channels": 1,
        "size": [8, 8],
        "mean": [0.5],
        "std": [0.25],
        "crop": False,
    }
    spec = serve_model(tiered).image_spec
    assert (spec.channels, spec.size, spec.mean, spec.std, spec.crop) == (
        1,
        (8, 8),
        (0.5,),
        (0.25,),
        False,
    )
    code = (
        "import sys, nnobfuscator.serving.app, nnobfuscator.serving.served_model; "
        "print(sorted(m for m in sys.modules if m.startswith('nnobfuscator.zoo')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
