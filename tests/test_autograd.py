"""A calibrated tiered model answers with autograd on as it does under ``torch.no_grad()``.

Calibration measures state (BatchNorm statistics per compute setting, activation statistics for
channel slimming, folded weights) under ``torch.inference_mode``; that state must be ordinary
tensors, or any later call with autograd on (a script, a notebook) fails. Each case calibrates a
trained tiny model, then checks every tier and a mixed batch: the same output with autograd on and
off, and a gradient that reaches the input. The same holds after save -> load.
"""

from __future__ import annotations

import pytest
import torch
from conftest import trained
from tiny_diffusion import CALL, tiny_pipeline

from nnobfuscator import TieredModel, calibrate, obfuscate

KEY = bytes(range(32))
TIERS = "free=70%,pro=90%,premium=full"
BATCHES = (["free"] * 4, ["pro"] * 4, ["premium"] * 4, ["free", "pro", "premium", "free"])

#: (model, degrading strategy, compute strategies): every strategy and compute strategy of
#: image models at least once
CASES = [
    ("resnet", "feature-mix", None),
    ("resnet", "weight-noise", None),
    ("resnet", "logit-noise", None),
    ("resnet", "aim-noise", None),
    ("resnet", "feature-mix", "block-skip"),
    ("resnet", "weight-noise", "input-resolution"),
    ("vgg", "feature-mix", "channel-slim"),
    ("vgg", "logit-noise", "channel-slim+input-resolution"),
]

#: strategies whose noise is fresh on every call (the AIM baseline): equal outputs not expected
FRESH_NOISE = {"aim-noise"}


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(str(p) for p in c))
def calibrated(request, trained_weights, digits8, tmp_path_factory):
    model_name, strategy, compute = request.param
    tiered = obfuscate(
        trained(model_name, trained_weights),
        tiers=TIERS,
        strategy=strategy,
        compute=compute,
        key=KEY,
    )
    calibrate(tiered, digits8["calibration"], digits8["test"], progress=False)
    folder = tmp_path_factory.mktemp("autograd") / "artifact"
    tiered.save_pretrained(folder)
    loaded = TieredModel.from_pretrained(folder, trained(model_name, trained_weights), key=KEY)
    return tiered, loaded, strategy


def _check_autograd(tiered: TieredModel, x: torch.Tensor, strategy: str) -> None:
    for tiers in BATCHES:
        inputs = x.clone().requires_grad_(True)
        out = tiered(inputs, tiers=tiers)
        assert out.requires_grad, f"{tiers}: the output is cut off from the graph"
        with torch.no_grad():
            reference = tiered(x, tiers=tiers)
        if strategy not in FRESH_NOISE or set(tiers) == {"premium"}:
            torch.testing.assert_close(out.detach(), reference, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        assert inputs.grad is not None and inputs.grad.abs().sum() > 0, tiers


def test_calibrated_model_runs_with_autograd_like_no_grad(calibrated, digits8) -> None:
    tiered, _, strategy = calibrated
    assert torch.is_grad_enabled()
    _check_autograd(tiered, digits8["test"].images[:4], strategy)


def test_loaded_model_runs_with_autograd_like_no_grad(calibrated, digits8) -> None:
    _, loaded, strategy = calibrated
    _check_autograd(loaded, digits8["test"].images[:4], strategy)


def test_calibrated_state_holds_no_inference_tensors(calibrated) -> None:
    tiered, _, _ = calibrated
    for strategy in tiered.strategies.values():
        for name, tensor in {**strategy.state_tensors(), **strategy.derived_tensors()}.items():
            assert not tensor.is_inference(), f"{strategy.name}: {name} is an inference tensor"


def test_pipeline_compute_tiers_answer_with_autograd_on(tmp_path) -> None:
    """Diffusers runs its pipeline call under ``no_grad`` itself: autograd on or off, the same
    images at every tier (fewer-steps and guidance-cutoff set, as calibration would)."""
    pytest.importorskip("diffusers")
    tiered = obfuscate(
        tiny_pipeline(tmp_path), tiers="free=60%,premium=full", compute="auto", call_options=CALL
    )
    tiered.set_strength("free", "feature-mix", 0.5)
    tiered.set_setting("free", "fewer-steps", {"share": 0.5})
    tiered.set_setting("free", "guidance-cutoff", {"share": 0.5})
    request = {"prompt": ["digit one", "a red cat"], "seed": torch.tensor([0, 1])}
    for tiers in (["free", "free"], ["free", "premium"]):
        on = tiered(request, tiers=tiers, output_type="pt").images
        with torch.no_grad():
            off = tiered(request, tiers=tiers, output_type="pt").images
        assert torch.equal(on, off)
