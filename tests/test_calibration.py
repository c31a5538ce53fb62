"""Calibration lands tiers on their targets; reports follow the shared schema."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import torch
from conftest import STRATEGIES, trained

from nnobfuscator import CalibrationError, calibrate, obfuscate

SHARED_SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "contracts" / "report.schema.json"


def schema() -> dict:
    return json.loads(files("nnobfuscator").joinpath("contracts/report.schema.json").read_text())


def _names(node: object) -> set[str]:
    """Every property name and enum value anywhere in a JSON schema."""
    if isinstance(node, dict):
        found = set(node.get("properties", {})) | {
            v for v in node.get("enum", []) if isinstance(v, str)
        }
        return found.union(*(_names(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_names(v) for v in node))
    return set()


def test_vendored_schema_matches_shared_contract():
    """The package's schema is the shared contract: equal to it where ``../shared`` sits beside
    the checkout (CI), and holding the contract's fields everywhere."""
    assert {"answer_format", "extractable", "text-generation"} <= _names(schema())
    if SHARED_SCHEMA.is_file():
        assert json.loads(SHARED_SCHEMA.read_text()) == schema()


@pytest.mark.parametrize("model_name", ["resnet", "vgg"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tiers_hit_targets_on_calibration_and_are_monotone(
    model_name, strategy, trained_weights, digits8
):
    base = trained(model_name, trained_weights)
    tiered = obfuscate(
        base, tiers="free=0.45,pro=0.75,premium=full", strategy=strategy, key=b"k" * 32
    )
    report = calibrate(tiered, digits8["calibration"], digits8["test"], progress=False)
    jsonschema.validate(report, schema())
    rows = {row["name"]: row for row in report["tiers"]}
    calibration_size = report["splits"]["calibration"]
    for name, target in (("free", 0.45), ("pro", 0.75)):
        achieved = rows[name]["achieved"]["calibration"]
        assert abs(achieved - target) <= 4 / calibration_size, (name, achieved)
        assert abs(rows[name]["achieved"]["test"] - target) < 0.12
    tests = [rows[n]["achieved"]["test"] for n in ("free", "pro", "premium")]
    assert tests == sorted(tests)
    assert rows["premium"]["achieved"]["test"] == report["base"]["test"]
    assert rows["premium"]["target"] is None and rows["premium"]["strategy"] == "none"
    if strategy == "feature-mix":  # mixing a wide layer's input costs a few percent more
        assert 1.0 <= rows["free"]["relative_cost"] <= 1.10
    else:
        assert rows["free"]["relative_cost"] == pytest.approx(1.0, abs=1e-6)


def test_relative_targets_resolve_against_the_full_model(trained_weights, digits8):
    tiered = obfuscate(
        trained("cnn", trained_weights),
        tiers="free=50%,premium=full",
        key=b"k" * 32,
        strategy="feature-mix",
    )
    report = calibrate(tiered, digits8["calibration"], digits8["test"], progress=False)
    assert report["tiers"][0]["target"] == pytest.approx(0.5 * report["base"]["calibration"])
    assert report["tiers"][0]["target_spec"] == "50%"


def test_target_above_full_model_is_a_clear_error(trained_weights, digits8):
    tiered = obfuscate(
        trained("cnn", trained_weights), tiers="free=0.999,premium=full", strategy="feature-mix"
    )
    with pytest.raises(CalibrationError, match="above the full model"):
        calibrate(tiered, digits8["calibration"], progress=False)


def test_unreachable_low_target_names_the_reachable_range(trained_weights, digits8):
    # Noise on a single late layer cannot push a trained net down to 1% accuracy.
    tiered = obfuscate(
        trained("resnet", trained_weights),
        tiers="free=0.01,premium=full",
        strategy="weight-noise",
        targets=["layer4.0.conv2"],
    )
    with pytest.raises(CalibrationError, match=r"reachable accuracy range is \[0\.\d+, 0\.\d+\]"):
        calibrate(tiered, digits8["calibration"], progress=False)


def test_calibration_accepts_a_dataset_and_a_tensor_pair(trained_weights, digits8):
    split = digits8["calibration"]
    dataset = torch.utils.data.TensorDataset(split.images, split.labels)
    for data in (dataset, (split.images, split.labels)):
        tiered = obfuscate(
            trained("cnn", trained_weights),
            tiers="free=0.5,premium=full",
            key=b"k" * 32,
            strategy="feature-mix",
        )
        report = calibrate(tiered, data, progress=False)
        assert report["splits"]["calibration"] == len(split)


def test_logit_noise_defeats_repeat_voting(trained_weights, digits8):
    """The AIM attack: a free user repeats each query 9 times and votes. Keyed noise gives nothing."""
    tiered = obfuscate(
        trained("cnn", trained_weights), tiers="free=0.5,premium=full", strategy="logit-noise"
    )
    calibrate(tiered, digits8["calibration"], progress=False)
    test = digits8["test"]
    with torch.inference_mode():
        votes = torch.stack([tiered(test.images, tier="free").argmax(1) for _ in range(9)])
    majority = votes.mode(dim=0).values
    single = (votes[0] == test.labels).float().mean()
    voted = (majority == test.labels).float().mean()
    assert torch.equal(majority, votes[0])
    assert voted == single


def test_calibrated_model_runs_outside_inference_mode(trained_weights, digits8):
    """Per-tier weights cached during calibration (inference mode) still work with autograd on."""
    tiered = obfuscate(
        trained("resnet", trained_weights), tiers="free=0.5,premium=full", strategy="feature-mix"
    )
    calibrate(tiered, digits8["calibration"], progress=False)
    x = digits8["test"].images[:4].clone().requires_grad_(True)
    tiered(x, tier="free").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
