"""The text-generation task and compute-only tiers of a causal LM, calibrated on token windows (a
tiny Llama trained for seconds on a patterned token stream: no hub, no corpus)."""

from __future__ import annotations

import json
import warnings
from importlib.resources import files

import jsonschema
import pytest
import torch
from tiny_llama import tiny_llama
from transformers import LlamaForCausalLM

from nnobfuscator import Split, calibrate, obfuscate
from nnobfuscator.tasks import get_task
from nnobfuscator.tasks.text_generation import IGNORE, next_token_labels

VOCAB = 40


def pattern_windows(count: int, length: int, seed: int) -> torch.Tensor:
    """Windows of a stream a small model learns: each row counts up by its own step (mod VOCAB)."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    step = torch.randint(1, 4, (count, 1), generator=generator)
    return (start + step * torch.arange(length)) % VOCAB


def windows_split(name: str, ids: torch.Tensor) -> Split:
    mask = torch.ones_like(ids)
    return Split(name, {"input_ids": ids, "attention_mask": mask}, next_token_labels(ids, mask))


@pytest.fixture(scope="module")
def trained_llama() -> LlamaForCausalLM:
    model = tiny_llama(vocab_size=VOCAB).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        ids = pattern_windows(32, 16, seed=step)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_next_token_labels_ignore_padding():
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert next_token_labels(ids, mask).tolist() == [[6, 7, 8], [IGNORE, IGNORE, 4]]


@torch.no_grad()
def test_the_scored_tensor_gives_accuracy_and_the_models_own_perplexity(trained_llama):
    task = get_task("text-generation")
    split = windows_split("test", pattern_windows(16, 16, seed=999))
    output = trained_llama(**split.inputs)
    read = task.read(output, split.inputs)
    assert read.shape == (16, 15, 2)
    accuracy = task.score(read, split.labels)
    expected = (output.logits[:, :-1].argmax(-1) == split.labels).float().mean()
    assert accuracy == pytest.approx(float(expected)) and accuracy > 0.8
    loss = trained_llama(**split.inputs, labels=split.inputs["input_ids"]).loss
    extra = task.extra(read, split.labels, read)
    assert extra["perplexity"] == pytest.approx(float(loss.exp()), rel=1e-4)
    assert extra["agreement_with_full"] == 1.0
    with pytest.raises(ValueError, match="token windows"):
        task.read(output, split.inputs["input_ids"])


def test_compute_only_tiers_calibrate_on_next_token_accuracy(trained_llama):
    calibration = windows_split("calibration", pattern_windows(32, 16, seed=1000))
    test = windows_split("test", pattern_windows(32, 16, seed=2000))
    tiered = obfuscate(
        trained_llama,
        tiers="free=50%,premium=full",
        strategy="none",
        compute="block-skip",
        task="text-generation",
        key=b"t" * 32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a compute-only tier may land above its target
        report = calibrate(tiered, calibration, test, progress=False, batch_size=16)
    assert report["task"] == "text-generation" and report["metric"] == "next_token_accuracy"
    schema = json.loads(files("nnobfuscator").joinpath("contracts/report.schema.json").read_text())
    jsonschema.validate(report, schema)
    free, premium = report["tiers"][0], report["tiers"][1]
    assert free["params"]["block-skip"]["skip"], "the free tier skips layers"
    assert free["relative_cost"] < 1.0
    assert free["achieved"]["calibration"] >= free["target"] - 0.02
    assert free["extra"]["perplexity"] > premium["extra"]["perplexity"]
    assert premium["achieved"]["test"] > free["achieved"]["test"]
    tiered.unload()  # the model is the module's fixture: give it back plain


class NotGated(torch.nn.Module):
    """Three linears and an activation like a gated MLP, but another function of them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)
        self.c, self.act = torch.nn.Linear(16, 8), torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.act(self.a(x)) + self.b(x))


def test_gated_mlps_are_found_by_structure_and_checked_on_a_probe(trained_llama):
    from nnobfuscator.strategies.blocks import slimmable_blocks
    from nnobfuscator.strategies.gated_mlp import gated_mlp_roles

    assert list(slimmable_blocks(trained_llama)) == [f"model.layers.{i}.mlp" for i in range(4)]
    mlp = trained_llama.model.layers[0].mlp
    assert gated_mlp_roles(mlp) == (mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)
    assert gated_mlp_roles(NotGated()) is None


@torch.no_grad()
def test_slimmed_mlps_and_skipped_layers_calibrate_together(trained_llama):
    calibration = windows_split("calibration", pattern_windows(32, 16, seed=3000))
    test = windows_split("test", pattern_windows(32, 16, seed=4000))
    tiered = obfuscate(
        trained_llama,
        tiers="free=60%,premium=full",
        strategy="none",
        compute="block-skip+channel-slim",
        task="text-generation",
        key=b"t" * 32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = calibrate(tiered, calibration, test, progress=False, batch_size=16)
    free = report["tiers"][0]
    assert free["relative_cost"] < 1.0 and free["achieved"]["calibration"] >= free["target"] - 0.02
    ids = test.inputs["input_ids"][:4, :6]
    options = {"max_new_tokens": 5, "do_sample": False}
    mixed = tiered.generate(ids, tiers=["free", "premium", "free", "premium"], **options)
    for row, tier in enumerate(["free", "premium", "free", "premium"]):
        alone = tiered.generate(ids[row : row + 1], tier=tier, **options)
        assert mixed[row, : alone.shape[1]].tolist() == alone[0].tolist()
    assert torch.equal(mixed[1], trained_llama.generate(ids[1:2], **options)[0])
    tiered.unload()


def test_tokens_of_one_passage_count_as_fewer_independent_samples():
    task = get_task("text-generation")
    targets = torch.zeros(20, 50, dtype=torch.long)
    # whole passages right or wrong: worth about one sample per passage
    together = torch.zeros(20, 50, 2)
    together[:10, :, 0] = 1.0
    assert task.effective_count(together, targets) == pytest.approx(20, abs=1)
    # right and wrong spread evenly over every passage: worth every token
    spread = torch.zeros(20, 50, 2)
    spread[:, ::2, 0] = 1.0
    assert task.effective_count(spread, targets) == task.sample_count(targets) == 1000
    # independent draws: the count stays near the tokens'
    generator = torch.Generator().manual_seed(0)
    random = torch.zeros(20, 50, 2)
    random[..., 0] = (torch.rand(20, 50, generator=generator) < 0.4).float()
    assert 500 < task.effective_count(random, targets) <= 1000
