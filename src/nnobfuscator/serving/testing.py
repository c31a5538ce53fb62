"""Helpers for tests and benchmarks: tiny tiered models, artifacts and a server in a thread."""

from __future__ import annotations

import io
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image
from torch import nn

from nnobfuscator.tiered.model import InputSpec, TieredModel
from nnobfuscator.tiered.obfuscate import obfuscate

TIERS = "free=60%,pro=85%,premium=full"
STRENGTHS = {"free": 1.0, "pro": 0.5}


def calibrated_by_hand(model: TieredModel, strengths: dict[str, float] | None = None) -> None:
    """Give every non-full tier a fixed strength (a stand-in for calibration in tests)."""
    for tier, strength in (strengths or STRENGTHS).items():
        for name in model.strategies:
            model.set_strength(tier, name, strength)


def torchvision_artifact(directory: str | Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """Write a tiered torchvision ResNet-18 (random weights, 10 classes, RGB) as an artifact whose
    source the server can rebuild, with its weights file next to it."""
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    base = resnet18(num_classes=10).eval()
    weights = directory / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    source = {
        "model": {"arch": "resnet18", "weights": str(weights.resolve()), "num_classes": 10},
        "data": {"image_size": image_size},
    }
    tiered = obfuscate(
        base,
        tiers=TIERS,
        strategy="feature-mix",
        key=bytes(range(32)),
        model_name="resnet18",
        input_spec=InputSpec(3, image_size, image_size),
        meta={"source": source, "classes": [f"class{i}" for i in range(10)]},
    )
    calibrated_by_hand(tiered)
    tiered.save_pretrained(str(directory))
    return directory


class TinySegmenter(nn.Module):
    """A two-layer conv net with torchvision's segmentation output ``{"out": (N, C, H, W)}``."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv2(torch.relu(self.conv1(x)))}


def image_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``(H, W)`` or ``(H, W, 3)`` array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def random_png(seed: int, size: int = 32, channels: int = 3) -> bytes:
    """A reproducible random image as PNG."""
    rng = np.random.default_rng(seed)
    shape = (size, size, channels) if channels == 3 else (size, size)
    return image_png(rng.integers(0, 256, shape, dtype=np.uint8))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    check: Callable[[], bool], process: subprocess.Popen, timeout_s: float = 120.0
) -> bool:
    """Poll ``check()`` (HTTP errors count as not yet) until it is true; ``False`` when
    ``process`` exits first or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def wait_until_serving(url: str, process: subprocess.Popen, timeout_s: float = 120.0) -> bool:
    """Poll ``url``/healthz until it answers 200 (:func:`wait_until`)."""
    import httpx

    return wait_until(
        lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, process, timeout_s
    )


@contextmanager
def serve_in_thread(app: FastAPI, *, port: int | None = None) -> Iterator[str]:
    """Run ``app`` with uvicorn on loopback in a background thread; yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="nnobf-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test server did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
