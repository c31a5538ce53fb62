"""The MobileNetV3 and ViT demo classifiers, and BatchNorm re-estimation (no training here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import MobileNetV3
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from nnobfuscator.zoo import build_model, digits_splits, list_models, load_zoo_model
from nnobfuscator.zoo import classifiers as zoo_classifiers
from nnobfuscator.zoo.classifiers import zoo_entry
from nnobfuscator.zoo.training import recalibrate_batchnorm


@pytest.mark.parametrize(
    ("name", "kind"), [("mobilenet_v3_small", MobileNetV3), ("vit", VisionTransformer)]
)
def test_builders_give_torchvision_models_with_digit_logits(name, kind):
    entry = zoo_entry(name)
    torch.manual_seed(0)
    model = build_model(name).eval()
    assert type(model) is kind  # torchvision's own class, not a subclass
    images = digits_splits(entry.image_size)["test"].images[:5]
    assert images.shape == (5, 1, entry.image_size, entry.image_size)
    with torch.inference_mode():
        logits = model(images)
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()


def test_small_input_adaptations():
    mobilenet = build_model("mobilenet_v3_small")
    stem = mobilenet.features[0][0]
    assert (stem.in_channels, stem.stride) == (1, (1, 1))
    with torch.inference_mode():
        features = mobilenet.eval().features(torch.zeros(1, 1, 32, 32))
    assert features.shape[-2:] == (2, 2)  # not collapsed to 1x1
    assert zoo_entry("mobilenet_v3_small").reestimate_bn

    vit = build_model("vit")
    assert vit.conv_proj.in_channels == 1 and vit.image_size == zoo_entry("vit").image_size
    assert sum(isinstance(m, EncoderBlock) for m in vit.modules()) == 4
    assert sum(isinstance(m, nn.MultiheadAttention) for m in vit.modules()) == 4
    assert not zoo_entry("vit").reestimate_bn


def test_list_models_lists_the_new_classifiers():
    names = list_models("classification")
    assert {"mobilenet_v3_small", "vit", "resnet18", "vgg16"} <= set(names)
    assert "vit" not in list_models("segmentation")


def _tiny_bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=0.01),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    ).eval()


def _stale(model: nn.Sequential) -> nn.BatchNorm2d:
    norm = model[1]
    norm.running_mean.fill_(5.0)
    norm.running_var.fill_(7.0)
    norm.num_batches_tracked.fill_(123)
    return norm


def _capture_inputs(norm: nn.Module) -> tuple[list[torch.Tensor], list[bool]]:
    inputs: list[torch.Tensor] = []
    modes: list[bool] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.append(args[0].detach().clone())
        modes.append(module.training)

    norm.register_forward_pre_hook(hook)
    return inputs, modes


@pytest.mark.parametrize("batch_size", [60, 20])
def test_recalibrate_batchnorm_sets_batch_statistics_and_keeps_weights(batch_size):
    images = digits_splits(8)["train"].images[:60]
    model = _tiny_bn_model()
    norm = _stale(model)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    inputs, modes = _capture_inputs(norm)

    assert recalibrate_batchnorm(model, images, batch_size=batch_size) is model

    seen = torch.cat(inputs)
    assert len(inputs) == 60 // batch_size and all(modes) and len(seen) == 60
    torch.testing.assert_close(norm.running_mean, seen.mean((0, 2, 3)))
    # Cumulative average of per-batch (unbiased) variances; one batch gives the exact variance.
    batch_vars = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs])
    torch.testing.assert_close(norm.running_var, batch_vars.mean(0))
    if batch_size == 60:
        torch.testing.assert_close(norm.running_var, seen.var((0, 2, 3), unbiased=True))
    assert int(norm.num_batches_tracked) == len(inputs)
    assert norm.momentum == 0.01 and not model.training
    for key, value in model.named_parameters():
        assert torch.equal(value, weights[key]), key


def test_recalibrated_statistics_match_eval_outputs_to_train_outputs():
    images = digits_splits(8)["train"].images[:40]
    model = _tiny_bn_model()
    _stale(model)
    with torch.no_grad():
        batch_stats_logits = model.train()(images)
        model.eval()
        stale_logits = model(images)
        recalibrate_batchnorm(model, images, batch_size=40)
        recalibrated_logits = model(images)
    assert not torch.allclose(stale_logits, batch_stats_logits, atol=1e-3)
    # Eval uses the unbiased variance, train mode the biased one: close, not identical.
    torch.testing.assert_close(recalibrated_logits, batch_stats_logits, atol=5e-3, rtol=5e-2)


def test_zoo_entry_opting_in_is_recalibrated_before_caching(tmp_path, monkeypatch):
    monkeypatch.setenv("NNOBF_HOME", str(tmp_path))
    monkeypatch.setattr(zoo_classifiers, "train_model", lambda model, *args, **kwargs: 0.0)
    model, info = load_zoo_model("mobilenet_v3_small", epochs=1, progress=False)
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # Untrained weights, but the statistics were re-estimated: not the reset defaults (0 / 1),
    # counted over the 900 training images in batches of at most 256.
    assert int(norm.num_batches_tracked) == 4 and norm.momentum == 0.01
    assert not torch.allclose(norm.running_mean, torch.zeros_like(norm.running_mean))
    assert info["model"] == "mobilenet_v3_small" and 0.0 <= info["test_accuracy"] <= 1.0
    cached, _ = load_zoo_model("mobilenet_v3_small", epochs=1, progress=False)
    for (key, a), b in zip(model.state_dict().items(), cached.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
