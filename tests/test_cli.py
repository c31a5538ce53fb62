"""The nnobf CLI end to end on a user's own torchvision model, weights file and ImageFolder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import models
from typer.testing import CliRunner

from nnobfuscator.cli import app
from nnobfuscator.jobs.sources import image_folder_split
from nnobfuscator.zoo.training import train_classifier

runner = CliRunner()
DATA = {"image_size": 16, "mean": [0.3, 0.3, 0.3], "std": [0.38, 0.38, 0.38]}


def write_image_folder(root, images, labels):
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f"{index}.png")


@pytest.fixture(scope="module")
def user_project(tmp_path_factory):
    """A user's project: ImageFolders, a trained torchvision resnet18 state dict, a YAML plan."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("project")
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    parts = {"train": order[:900], "cal": order[900:1300], "test": order[1300:]}
    for name, index in parts.items():
        write_image_folder(root / name, digits.images[index], digits.target[index])
    train = image_folder_split(
        root / "train", "train", image_size=16, mean=DATA["mean"], std=DATA["std"]
    )
    torch.manual_seed(0)
    model = models.resnet18(weights=None, num_classes=10)
    train_classifier(
        model, train, epochs=3, lr=3e-3, optimizer="adamw", batch_size=128, progress=False
    )
    torch.save(model.state_dict(), root / "resnet18-digits.pt")
    plan = {
        "model": {"arch": "resnet18", "weights": "resnet18-digits.pt", "num_classes": 10},
        "data": {"calibration": "cal", "test": "test", "train": "train", **DATA},
        "tiers": "free=60%,pro=85%,premium=full",
        "strategy": "feature-mix",
        "out": "artifact",
    }
    (root / "plan.yaml").write_text(yaml.safe_dump(plan))
    return root


def test_calibrate_eval_info(user_project):
    result = runner.invoke(app, ["calibrate", str(user_project / "plan.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    for word in ("free", "pro", "premium", "feature-mix", "relative cost"):
        assert word in result.output
    artifact = user_project / "artifact"
    report = json.loads((artifact / "report.json").read_text())
    assert report["model"] == "resnet18" and report["dataset"] == "cal"
    assert (artifact / "tiers.png").read_bytes()[:4] == b"\x89PNG"
    tests = [t["achieved"]["test"] for t in report["tiers"]]
    two_se = 2 * (0.25 / report["splits"]["test"]) ** 0.5  # tiers land on calibration targets
    assert all(low <= high + two_se for low, high in zip(tests, tests[1:], strict=False))

    result = runner.invoke(app, ["eval", str(artifact)])
    assert result.exit_code == 0, result.output
    again = json.loads((artifact / "eval-report.json").read_text())
    assert [t["achieved"]["test"] for t in again["tiers"]] == tests

    result = runner.invoke(app, ["info", str(artifact)])
    assert result.exit_code == 0, result.output
    assert "layer3.0.conv1" in result.output and "premium" in result.output


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"model": {"arch": "resnet18"}, "data": {}}, "needs 'zoo: NAME' or both"),
        ({"model": {"arch": "resnet18", "weights": "nope.pt"}, "data": {}}, "does not exist"),
        ({"model": {}, "data": {}, "colour": "red"}, "unknown keys"),
        ({"model": "resnet18", "data": {}}, "'model' must be a mapping"),
        (
            {"model": {}, "data": {}, "strategy": {"name": "feature-mix", "blok": 64}},
            "unknown options ['blok']",
        ),
        ({"model": {}, "data": {}, "strategy": [{"name": "feature-mix", "block": 1}]}, ">= 2"),
    ],
)
def test_bad_plans_exit_2_with_a_reason(tmp_path, plan, message):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    result = runner.invoke(app, ["calibrate", str(path)])
    assert result.exit_code == 2
    assert message in result.output


def test_missing_plan_and_artifact(tmp_path):
    result = runner.invoke(app, ["calibrate", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "config.json is missing" in result.output


def test_demo_rejects_unknown_model_and_bad_tiers():
    result = runner.invoke(app, ["demo", "--model", "alexnet"])
    assert result.exit_code == 2 and "resnet18" in result.output
    result = runner.invoke(app, ["demo", "--tiers", "free=2"])
    assert result.exit_code == 2 and "must lie in" in result.output


def test_strategies_listed():
    result = runner.invoke(app, ["strategies"])
    assert result.exit_code == 0
    assert all(name in result.output for name in ("feature-mix", "weight-noise", "logit-noise"))


def test_compute_plan_makes_free_cheaper_and_reports_budget_conflicts(user_project):
    plan = yaml.safe_load((user_project / "plan.yaml").read_text())
    plan.update(tiers="free=60%,premium=full", compute=True, out="artifact-compute")
    path = user_project / "plan-compute.yaml"
    path.write_text(yaml.safe_dump(plan))
    result = runner.invoke(app, ["calibrate", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "latency / batch" in result.output
    report = json.loads((user_project / "artifact-compute" / "report.json").read_text())
    free = report["tiers"][0]
    assert free["relative_cost"] < 1.0 and free["strategy"] != "feature-mix"

    plan.update(tiers="free=95%@0.05,premium=full")
    path.write_text(yaml.safe_dump(plan))
    result = runner.invoke(app, ["calibrate", str(path), "--quiet"])
    assert result.exit_code == 2
    assert "max_cost=0.05 conflict" in result.output


def test_a_users_mobilenet_v3_calibrates_end_to_end_through_a_plan(tmp_path, user_project):
    """Depthwise convolutions, inverted residuals and squeeze-excitation: a plan with defaults."""
    from nnobfuscator.zoo.training import recalibrate_batchnorm

    data = {**DATA, "image_size": 32}
    train = image_folder_split(
        user_project / "train", "train", image_size=32, mean=data["mean"], std=data["std"]
    )
    torch.manual_seed(0)
    model = models.mobilenet_v3_small(weights=None, num_classes=10)
    train_classifier(
        model, train, epochs=6, lr=3e-3, optimizer="adamw", batch_size=64, progress=False
    )
    recalibrate_batchnorm(model, train.images)  # momentum 0.01 leaves stale statistics
    torch.save(model.state_dict(), tmp_path / "mnv3.pt")
    plan = {
        "model": {"arch": "mobilenet_v3_small", "weights": "mnv3.pt", "num_classes": 10},
        "data": {
            "calibration": str(user_project / "cal"),
            "test": str(user_project / "test"),
            **data,
        },
        "tiers": "free=60%,premium=full",
        "compute": True,
        "out": "artifact",
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    result = runner.invoke(app, ["calibrate", str(tmp_path / "plan.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "artifact" / "report.json").read_text())
    free, premium = report["tiers"]
    assert premium["achieved"]["test"] > 0.5  # the model learned digits
    assert abs(free["achieved"]["calibration"] - free["target"]) < 0.03
    assert "class-merge" in free["strategy"] and free["relative_cost"] < 1.0  # strategy auto
    result = runner.invoke(app, ["info", str(tmp_path / "artifact")])
    assert result.exit_code == 0 and "block-skip on" in result.output


def test_seal_and_unseal_a_users_artifact(user_project, tmp_path):
    """`nnobf seal` prints one key per higher tier (stdout only); `nnobf unseal` measures each
    tier as served and refuses a key above its tier."""
    artifact = user_project / "artifact"
    if not (artifact / "config.json").is_file():
        assert (
            runner.invoke(app, ["calibrate", str(user_project / "plan.yaml"), "--quiet"]).exit_code
            == 0
        )
    bundle = tmp_path / "bundle"
    result = runner.invoke(app, ["seal", str(artifact), "--out", str(bundle)])
    assert result.exit_code == 0, result.output
    keys = dict(line.split("\t") for line in result.stdout.splitlines() if "\t" in line)
    assert list(keys) == ["pro", "premium"]
    for key in keys.values():  # printed, never written
        assert all(key.encode() not in p.read_bytes() for p in bundle.iterdir())
    served = {
        t["name"]: t["metrics"]["test"]
        for t in json.loads((artifact / "config.json").read_text())["tiers"]
    }
    for tier, key in [("free", None), *keys.items()]:
        result = runner.invoke(
            app, ["unseal", str(bundle), "--evaluate", *(["--key", key] if key else [])]
        )
        assert result.exit_code == 0, result.output
        assert f"{tier}: test accuracy {100 * served[tier]:.1f}%" in result.stdout
    result = runner.invoke(app, ["unseal", str(bundle), "--key", keys["pro"], "--tier", "premium"])
    assert result.exit_code == 2 and "not 'premium'" in result.output
    result = runner.invoke(app, ["unseal", str(bundle), "--key", keys["pro"][:-3]])
    assert result.exit_code == 2 and "truncated or mistyped" in result.output
    out = tmp_path / "pro.safetensors"
    result = runner.invoke(
        app, ["unseal", str(bundle), "--out", str(out)], env={"NNOBF_TIER_KEY": keys["pro"]}
    )
    assert result.exit_code == 0 and out.is_file()


def test_attack_on_a_sealed_bundle_reports_fine_tuning_against_scratch(user_project, tmp_path):
    artifact = user_project / "artifact"
    if not (artifact / "config.json").is_file():
        assert (
            runner.invoke(app, ["calibrate", str(user_project / "plan.yaml"), "--quiet"]).exit_code
            == 0
        )
    bundle = tmp_path / "bundle"
    assert runner.invoke(app, ["seal", str(artifact), "--out", str(bundle)]).exit_code == 0
    result = runner.invoke(app, ["attack", str(bundle), "--train-steps", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((bundle / "attack-report.json").read_text())
    attacks = [(r["attack"], r["setting"]) for r in report["results"]]
    assert ("fine-tune", "10%") in attacks and ("scratch", "10%") in attacks
    assert ("clip", "t=2") in attacks and attacks[-1][0] == "replace+fine-tune"
    assert (bundle / "attacks.png").read_bytes()[:4] == b"\x89PNG"
