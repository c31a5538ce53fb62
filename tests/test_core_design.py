"""Design rules the core keeps: registries refuse duplicates, the HTTP stack loads on use only,
outputs are read and batches split in one place."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from nnobfuscator import (
    LayerAdapter,
    Strategy,
    read_output,
    register_block,
    register_layer_adapter,
    register_strategy,
)
from nnobfuscator.core.outputs import scatter, select_call
from nnobfuscator.tasks import ClassificationTask
from nnobfuscator.tasks.base import register_task


def test_registries_refuse_a_duplicate_name():
    class Again(Strategy):
        name = "feature-mix"

    with pytest.raises(ValueError, match="already registered"):
        register_strategy(Again)
    with pytest.raises(ValueError, match="already registered"):
        register_task(ClassificationTask)
    with pytest.raises(ValueError, match="already has a block adapter"):
        register_block(BasicBlock, lambda block: True)
    with pytest.raises(ValueError, match="already has a layer adapter"):
        register_layer_adapter(nn.Linear, LayerAdapter("weight", lambda m, w, x: x))


def test_importing_the_library_does_not_import_the_http_stack():
    code = "import sys, nnobfuscator; print(sorted({'fastapi', 'uvicorn', 'starlette'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_outputs_are_read_from_every_shape_a_model_returns():
    logits = torch.arange(6.0).view(2, 3)

    class Output(dict):  # a ModelOutput-like mapping with attribute access
        __getattr__ = dict.get

    assert read_output(logits) is logits
    assert read_output({"out": logits, "aux": logits + 1}) is logits
    assert read_output(Output(logits=logits)) is logits
    assert read_output((logits, logits + 1)) is logits
    with pytest.raises(TypeError, match="cannot read a tensor"):
        read_output("text")


def test_a_call_is_split_per_sample_and_scattered_back():
    x, mask, step = torch.arange(8.0).view(4, 2), torch.ones(4, 3), torch.tensor(7)
    rows = torch.tensor([2, 0])
    args, kwargs = select_call(
        (x,), {"mask": mask, "timestep": step, "prompt": list("abcd")}, rows, 4
    )
    assert torch.equal(args[0], x[[2, 0]]) and kwargs["mask"].shape == (2, 3)
    assert kwargs["timestep"] is step and kwargs["prompt"] == ["c", "a"]
    merged = scatter([(rows, {"out": x[rows]}), (torch.tensor([1, 3]), {"out": x[[1, 3]]})], 4)
    assert torch.equal(merged["out"], x)


class ToyDenoiser(nn.Module):
    """Keyword inputs as a diffusers UNet takes them: a batch, a shared timestep, a condition."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(4, 16, 3, padding=1)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.to_q = nn.Linear(16, 16)
        self.conv_out = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states):
        h = self.conv_in(sample) + timestep.float().view(-1, 1, 1, 1) / 1000
        h = self.mid(torch.relu(h))
        h = h + self.to_q(encoder_hidden_states.mean(1))[:, :, None, None]
        return {"sample": self.conv_out(torch.relu(h))}


@torch.inference_mode()
def test_keyword_inputs_with_a_shared_timestep_are_split_per_sample():
    from nnobfuscator import obfuscate

    tiered = obfuscate(
        ToyDenoiser(), tiers="free=0.5,premium=full", key=b"u" * 32, strategy="feature-mix"
    )
    assert set(tiered.describe()["strategies"]["feature-mix"]) == {"mid", "to_q"}
    tiered.set_strength("free", "feature-mix", 0.7)
    call = {
        "sample": torch.randn(4, 4, 8, 8),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(4, 5, 16),
    }
    names = ["free", "premium", "premium", "free"]
    mixed = tiered(**call, tiers=names)["sample"]
    plain = ToyDenoiser()(**call)["sample"]
    torch.testing.assert_close(mixed[[1, 2]], plain[[1, 2]])
    free = tiered(**call, tier="free")["sample"]
    torch.testing.assert_close(mixed[[0, 3]], free[[0, 3]])
    assert not torch.allclose(free, plain)
