"""Segmentation: digit scenes, mIoU, torchvision DeepLabV3/FCN dict outputs at every tier."""

from __future__ import annotations

import jsonschema
import pytest
import torch
from test_calibration import schema
from torch import nn
from torchvision import models
from torchvision.models import ResNet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock
from torchvision.models.segmentation import FCN, DeepLabV3
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead
from typer.testing import CliRunner

from nnobfuscator import TieredModel, calibrate, obfuscate
from nnobfuscator.calibration.runner import SplitRunner
from nnobfuscator.cli import app
from nnobfuscator.jobs.sources import load_base_model
from nnobfuscator.tasks import get_task
from nnobfuscator.tasks.masks import plot_masks
from nnobfuscator.tiered.cost import tier_flops
from nnobfuscator.zoo import digit_scenes
from nnobfuscator.zoo.segmenters import small_deeplabv3, small_fcn
from nnobfuscator.zoo.training import train_model

KEY = b"s" * 32


def tiny_backbone() -> nn.Module:
    """A small torchvision ResNet (two blocks in layer1/layer2) cut after layer2 (stride 8)."""
    net = ResNet(BasicBlock, [2, 2, 1, 1])
    net.conv1 = nn.Conv2d(1, 64, 3, 2, 1, bias=False)
    return IntermediateLayerGetter(net, return_layers={"layer2": "out"})


BUILDERS = {
    "deeplabv3": lambda: DeepLabV3(tiny_backbone(), DeepLabHead(128, 11), None),
    "fcn": lambda: FCN(tiny_backbone(), FCNHead(128, 11), None),
}


@pytest.fixture(scope="module")
def scenes():
    return digit_scenes(32, counts={"train": 300, "calibration": 64, "test": 64})


@pytest.fixture(scope="module")
def trained_segmenters(scenes):
    """State dicts of both demo architectures after a few seconds of training on 32px scenes."""
    task = get_task("segmentation")
    weights = {}
    for name, build in BUILDERS.items():
        torch.manual_seed(0)
        model = build()
        train_model(
            model,
            scenes["train"],
            epochs=20,
            lr=3e-3,
            optimizer="adamw",
            batch_size=32,
            read_logits=task.logits,
            progress=False,
        )
        weights[name] = {k: v.clone() for k, v in model.state_dict().items()}
    return weights


def fresh(name: str, weights) -> torch.nn.Module:
    model = BUILDERS[name]()
    model.load_state_dict(weights[name])
    return model.eval()


def test_digit_scenes_are_deterministic_and_fully_labelled():
    first, again = digit_scenes(24, counts={"train": 8}), digit_scenes(24, counts={"train": 8})
    for name in ("train", "calibration", "test"):
        torch.testing.assert_close(first[name].images, again[name].images)
        assert torch.equal(first[name].labels, again[name].labels)
    train = first["train"]
    assert train.images.shape == (8, 1, 24, 24) and train.labels.shape == (8, 24, 24)
    assert train.labels.min() >= 0 and train.labels.max() <= 10
    assert all((mask > 0).any() for mask in train.labels)  # every scene has digit pixels
    assert not torch.equal(first["calibration"].images[:8], train.images)
    with pytest.raises(ValueError, match="at least 12"):
        digit_scenes(8)


def test_miou_metric():
    task = get_task("segmentation")
    truth = torch.tensor([[[0, 0], [1, 2]]])
    perfect = torch.nn.functional.one_hot(truth, 3).permute(0, 3, 1, 2).float()
    assert task.score(perfect, truth) == pytest.approx(1.0)
    wrong = perfect.clone()
    wrong[0, :, 1, 1] = torch.tensor([0.0, 1.0, 0.0])  # class 2 predicted as 1
    # IoU: background 1, class 1 = 1/2, class 2 = 0  -> mean 0.5
    assert task.score(wrong, truth) == pytest.approx(0.5)
    extra = task.extra(wrong, truth, perfect)
    assert extra["iou_class_1"] == pytest.approx(0.5) and extra["pixel_accuracy"] == 0.75
    with pytest.raises(ValueError, match="masks"):
        task.score(perfect, truth[0])


@pytest.mark.parametrize("name", ["deeplabv3", "fcn"])
def test_calibrated_tiers_keep_dict_outputs_and_full_is_bit_exact(name, trained_segmenters, scenes):
    base = fresh(name, trained_segmenters)
    reference = fresh(name, trained_segmenters)
    tiered = obfuscate(
        base,
        tiers="free=50%,premium=full",
        task="segmentation",
        key=KEY,
        model_name=name,
        strategy="feature-mix",
    )
    report = calibrate(tiered, scenes["calibration"], scenes["test"], progress=False)
    jsonschema.validate(report, schema())
    assert report["metric"] == "miou" and report["task"] == "segmentation"
    assert report["base"]["test"] > 0.2  # learnt more than "all background" (~0.08)
    free = report["tiers"][0]
    target = 0.5 * report["base"]["calibration"]
    assert abs(free["achieved"]["calibration"] - target) < 0.02
    assert "iou_class_0" in free["extra"]
    x = scenes["test"].images[:6]
    with torch.inference_mode():
        out = tiered(x, tier="free")
        assert isinstance(out, dict) and out["out"].shape == (6, 11, 32, 32)
        full = tiered(x, tier="premium")["out"]
        assert torch.equal(full, reference(x)["out"])
        mixed = tiered(x, tiers=["free", "premium"] * 3)["out"]
        torch.testing.assert_close(mixed[0::2], tiered(x[0::2], tier="free")["out"])
        torch.testing.assert_close(mixed[1::2], full[1::2])


def test_split_runner_matches_the_model_forward(trained_segmenters, scenes):
    """The cached-prefix evaluation of DeepLabV3 equals running the whole model."""
    tiered = obfuscate(
        fresh("deeplabv3", trained_segmenters),
        tiers="free=0.2,premium=full",
        task="segmentation",
        compute="input-resolution",
        key=KEY,
        strategy="feature-mix",
    )
    tiered.set_strength("free", "feature-mix", 0.4)
    tiered.set_setting("free", "input-resolution", {"scale": 0.75})
    images = scenes["test"].images[:10]
    runner = SplitRunner(tiered, images, get_task("segmentation").read, batch_size=4)
    with torch.inference_mode():
        direct = tiered(images, tier="free")["out"]
    torch.testing.assert_close(runner.logits("free"), direct, rtol=1e-4, atol=1e-4)
    assert direct.shape[-2:] == images.shape[-2:]


def test_logit_noise_is_per_pixel_and_deterministic(trained_segmenters, scenes):
    tiered = obfuscate(
        fresh("fcn", trained_segmenters),
        tiers="free=0.2,premium=full",
        task="segmentation",
        strategy="logit-noise",
        key=KEY,
    )
    tiered.set_strength("free", "logit-noise", 2.0)
    x = scenes["test"].images[:3]
    with torch.inference_mode():
        first, second = tiered(x, tier="free")["out"], tiered(x, tier="free")["out"]
        clean = tiered(x, tier="premium")["out"]
    assert torch.equal(first, second)
    noise = first - clean
    assert noise[0, 0].std() > 0  # varies from pixel to pixel


def test_save_load_and_compute_tiers(tmp_path, trained_segmenters, scenes):
    tiered = obfuscate(
        fresh("fcn", trained_segmenters),
        tiers="free=40%,premium=full",
        task="segmentation",
        compute="auto",
        key=KEY,
        strategy="feature-mix",
    )
    report = calibrate(tiered, scenes["calibration"], scenes["test"], progress=False)
    assert report["tiers"][0]["relative_cost"] < 1.0
    tiered.save_pretrained(str(tmp_path / "seg"))
    loaded = TieredModel.from_pretrained(str(tmp_path / "seg"), fresh("fcn", trained_segmenters))
    x = scenes["test"].images[:4]
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x, tier="free")["out"], tiered(x, tier="free")["out"])
    assert tier_flops(loaded, x[:1], "free") < tier_flops(loaded, x[:1], None)
    picture = plot_masks(loaded, scenes["test"], tmp_path / "masks.png", scenes=2)
    assert picture.read_bytes()[:4] == b"\x89PNG"


def test_torchvision_segmentation_builder_with_local_weights(tmp_path):
    """deeplabv3_resnet50 from a local file: no backbone download, aux head detected."""
    model = models.get_model(
        "deeplabv3_resnet50", weights=None, weights_backbone=None, num_classes=3, aux_loss=True
    )
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded, info = load_base_model(
        {"arch": "deeplabv3_resnet50", "weights": str(tmp_path / "w.pt"), "num_classes": 3},
        progress=False,
    )
    assert info["model"] == "deeplabv3_resnet50" and loaded.aux_classifier is not None
    tiered = obfuscate(
        loaded, tiers="free=0.5,premium=full", task="segmentation", key=KEY, strategy="feature-mix"
    )
    assert any(
        name.startswith("backbone.layer") for name in tiered.strategies["feature-mix"].layers
    )


def test_demo_rejects_models_of_the_other_task():
    result = CliRunner().invoke(app, ["demo", "--task", "segmentation", "--model", "resnet18"])
    assert result.exit_code == 2 and "deeplabv3" in result.output


@pytest.mark.parametrize("builder", [small_deeplabv3, small_fcn])
def test_demo_segmenters_are_torchvision_models_with_resnet_backbones(builder):
    model = builder(11, 1).eval()
    assert type(model).__name__ in {"DeepLabV3", "FCN"}
    with torch.inference_mode():
        out = model(torch.randn(2, 1, 48, 48))
    assert out["out"].shape == (2, 11, 48, 48)
    tiered = obfuscate(
        model,
        tiers="free=0.5,premium=full",
        task="segmentation",
        compute="auto",
        strategy="feature-mix",
    )
    assert "backbone.layer2.1" in tiered.compute["block-skip"].layers


def test_served_segmentation_classes_are_named():
    from nnobfuscator.jobs.sources import class_names

    names = class_names({"zoo": "digit-scenes", "image_size": 48})
    assert (
        names is not None and names[0] == "background" and names[1:] == [str(i) for i in range(10)]
    )


def test_mask_folders_load_as_a_segmentation_split(tmp_path, scenes):
    """Users' own data: split/images/*.png and split/masks/*.png (class indices, 255 = void)."""
    import numpy as np
    from PIL import Image

    from nnobfuscator.jobs.sources import SourceError, load_split

    (tmp_path / "cal" / "images").mkdir(parents=True)
    (tmp_path / "cal" / "masks").mkdir()
    truth = scenes["test"].labels[:3].clone()
    truth[0, 0, :4] = 255  # a void strip
    for index in range(3):
        pixels = (scenes["test"].images[index, 0] * 0.235 + 0.12).clamp(0, 1).numpy()
        Image.fromarray((pixels * 255).astype(np.uint8)).save(tmp_path / f"cal/images/{index}.png")
        Image.fromarray(truth[index].numpy().astype(np.uint8)).save(
            tmp_path / f"cal/masks/{index}.png"
        )
    split = load_split(
        {
            "calibration": str(tmp_path / "cal"),
            "image_size": 32,
            "mean": [0.5],
            "std": [0.5],
            "grayscale": True,
        },
        "calibration",
    )
    assert split.images.shape == (3, 1, 32, 32) and torch.equal(split.labels, truth)
    task = get_task("segmentation")
    perfect = torch.nn.functional.one_hot(truth.clamp(max=10), 11).permute(0, 3, 1, 2).float()
    assert task.score(perfect, truth) == pytest.approx(1.0)  # void pixels are ignored
    (tmp_path / "cal" / "masks" / "0.png").unlink()
    (tmp_path / "cal" / "masks" / "1.png").unlink()
    (tmp_path / "cal" / "masks" / "2.png").unlink()
    with pytest.raises(SourceError, match="no image"):
        load_split({"calibration": str(tmp_path / "cal")}, "calibration")
