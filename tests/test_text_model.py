"""A Hugging Face text classifier built from a config (no hub): token-id inputs, ModelOutput out."""

from __future__ import annotations

import pytest
import torch
from invariants import check_invariants

from nnobfuscator import Split, calibrate, obfuscate

transformers = pytest.importorskip("transformers")

KEY = b"t" * 32
VOCAB, LENGTH, CLASSES = 64, 12, 3


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=CLASSES,
    )
    return transformers.BertForSequenceClassification(config).eval()


def token_batch(count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (count, LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    mask[: count // 2, LENGTH - 3 :] = 0  # some padded sequences
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("strategy", ["feature-mix", "weight-noise", "logit-noise"])
@torch.inference_mode()
def test_invariants_hold_for_a_text_classifier(strategy, tmp_path):
    batch = token_batch(6)
    expected = tiny_bert()(**batch).logits
    tiered = obfuscate(
        tiny_bert(), tiers="free=0.5,pro=0.8,premium=full", strategy=strategy, key=KEY
    )
    assert tiered.strategies[strategy].layers or strategy == "logit-noise"
    for tier, strength in (("free", 0.8), ("pro", 0.4)):
        tiered.set_strength(tier, strategy, strength * tiered.strategies[strategy].max_strength)
    output = tiered(**batch, tier="premium")
    assert isinstance(output, transformers.modeling_outputs.SequenceClassifierOutput)
    assert torch.equal(output.logits, expected)
    assert torch.equal(tiered(batch, tier="free").logits, tiered(**batch, tier="free").logits)
    check_invariants(tiered, batch, expected_full=expected, rebuild=tiny_bert, tmp_path=tmp_path)


def test_calibration_runs_on_token_inputs():
    """A classifier that learned which third of the vocabulary its first token is in gets tiers."""
    model = tiny_bert().train()
    data = token_batch(600, seed=1)
    labels = data["input_ids"][:, 0] * 3 // VOCAB
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(4):
        for start in range(0, 400, 32):
            part = {k: v[start : start + 32] for k, v in data.items()}
            loss = model(**part, labels=labels[start : start + 32]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    calibration = Split("calibration", {k: v[400:500] for k, v in data.items()}, labels[400:500])
    test = Split("test", {k: v[500:] for k, v in data.items()}, labels[500:])
    tiered = obfuscate(model, tiers="free=85%,premium=full", strategy="feature-mix", key=KEY)
    report = calibrate(tiered, calibration, test, progress=False)
    free, premium = report["tiers"]
    assert premium["achieved"]["calibration"] > 0.6  # the model learned something
    assert abs(free["achieved"]["calibration"] - free["target"]) <= 0.05
    assert free["achieved"]["test"] < premium["achieved"]["test"]
