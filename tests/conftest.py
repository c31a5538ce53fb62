"""Shared fixtures: tiny torchvision models trained for seconds on 8x8 digits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import VGG, ResNet
from torchvision.models.resnet import BasicBlock
from torchvision.models.vgg import make_layers

from nnobfuscator.zoo.digits import digits_splits
from nnobfuscator.zoo.training import train_classifier

torch.set_num_threads(2)


def tiny_resnet() -> nn.Module:
    """torchvision ResNet with one BasicBlock per stage, for 1x8x8 inputs."""
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    return model.eval()


def tiny_vgg() -> nn.Module:
    """torchvision VGG with a few narrow conv blocks, for 1x8x8 inputs."""
    torch.manual_seed(0)
    features = make_layers([16, 16, "M", 32, 32, "M", 64, 64], batch_norm=True)
    features[0] = nn.Conv2d(1, 16, 3, padding=1)
    with torch.device("meta"):  # skip allocating VGG's 120M-parameter default classifier
        model = VGG(nn.Identity(), num_classes=10, init_weights=False)
    model.features = features
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return model.eval()


def tiny_cnn() -> nn.Module:
    """A plain nn.Sequential CNN (no architecture-specific defaults)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


BUILDERS = {"resnet": tiny_resnet, "vgg": tiny_vgg, "cnn": tiny_cnn}
RECIPES = {"resnet": (5, 5e-3), "vgg": (5, 5e-3), "cnn": (8, 1e-2)}  # epochs, learning rate
STRATEGIES = ["feature-mix", "weight-noise", "logit-noise"]


USER_HOME = Path(os.environ.get("NNOBF_HOME") or Path.home() / ".cache" / "nnobfuscator")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's model cache (except through ``trained_sd_digits``)."""
    monkeypatch.setenv("NNOBF_HOME", str(tmp_path_factory.getbasetemp() / "nnobf-home"))


@pytest.fixture
def trained_sd_digits(monkeypatch):
    """Slow tests of the text-to-image demo read the user's cache, where `nnobf demo --task
    text-to-image` trained sd-digits (about 9 minutes on 2 cores: too long for a test run)."""
    from nnobfuscator.zoo import text_to_image

    monkeypatch.setenv("NNOBF_HOME", str(USER_HOME))
    if not (text_to_image.zoo_pipeline_folder() / "nnobf_info.json").is_file():
        pytest.skip(f"sd-digits is not trained in {USER_HOME}: `nnobf demo --task text-to-image`")


@pytest.fixture(scope="session")
def digits8():
    return digits_splits(image_size=8)


@pytest.fixture(scope="session")
def trained_weights(digits8) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of the tiny models after a few epochs on digits (trained once per session)."""
    weights = {}
    for name, build in BUILDERS.items():
        model = build()
        torch.manual_seed(0)
        epochs, lr = RECIPES[name]
        train_classifier(
            model,
            digits8["train"],
            epochs=epochs,
            lr=lr,
            optimizer="adamw",
            batch_size=32,
            progress=False,
        )
        weights[name] = {k: v.clone() for k, v in model.state_dict().items()}
    return weights


def trained(name: str, weights: dict[str, dict[str, torch.Tensor]]) -> nn.Module:
    """A fresh instance of a tiny model carrying its trained weights."""
    model = BUILDERS[name]()
    model.load_state_dict(weights[name])
    return model.eval()


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory):
    """One ``redis-server`` for the session on a free loopback port (skips without the binary)."""
    from redis_support import SKIP_REASON, redis_server

    try:
        with redis_server(tmp_path_factory.mktemp("redis")) as url:
            yield url
    except FileNotFoundError:
        pytest.skip(SKIP_REASON)


@pytest.fixture
def redis_url(redis_server_url):
    """``redis://127.0.0.1:N/0`` of the session's Redis, emptied before each test."""
    from redis_support import flush

    flush(redis_server_url)
    return redis_server_url
