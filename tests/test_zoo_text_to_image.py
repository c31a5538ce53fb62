"""The demo text-to-image pipeline (tiny Stable Diffusion on digits) and its judge."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from nnobfuscator.zoo import text_to_image as t2i  # noqa: E402
from nnobfuscator.zoo.judge import DigitJudge, load_judge, real_digits  # noqa: E402
from nnobfuscator.zoo.training import evaluate_accuracy  # noqa: E402

TINY_CALL = {"num_inference_steps": 2, "guidance_scale": 4.0}


@pytest.fixture(scope="module")
def pipe():
    return t2i.build_pipeline()


def test_tokenizer_round_trips_the_prompt_vocabulary(tmp_path):
    tokenizer = t2i.build_tokenizer(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"vocab.json", "merges.txt"}
    assert tokenizer.model_max_length == t2i.MAX_TOKENS
    prompts = [t2i.prompt_for(d, p) for d in range(10) for p in range(len(t2i.PHRASINGS))]
    for word in {w for prompt in prompts for w in prompt.split()}:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    batch = tokenizer(prompts + [""], padding="max_length", max_length=tokenizer.model_max_length)
    for prompt, ids in zip(prompts + [""], batch.input_ids, strict=True):
        assert len(ids) == t2i.MAX_TOKENS
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    unknown = tokenizer("Zebra crossing, ünïcode ✓ 42!", truncation=True).input_ids
    assert all(0 <= i < len(tokenizer) for i in unknown)


def test_prompt_splits_are_disjoint_balanced_and_fixed():
    splits = t2i.prompt_splits(calibration=120, test=60)
    again = t2i.prompt_splits(calibration=120, test=60)
    calibration, test = splits["calibration"], splits["test"]
    assert (len(calibration), len(test)) == (120, 60)
    for name, split in splits.items():
        assert split.inputs["prompt"] == again[name].inputs["prompt"]
        assert torch.equal(split.inputs["seed"], again[name].inputs["seed"])
        assert split.inputs["seed"].dtype == torch.long and split.labels.dtype == torch.long
        assert torch.bincount(split.labels, minlength=10).tolist() == [len(split) // 10] * 10
        for prompt, digit in zip(split.inputs["prompt"], split.labels.tolist(), strict=True):
            words = prompt.split()
            assert t2i.DIGIT_WORDS[digit] in words or str(digit) in words
        every = {t2i.prompt_for(d, p) for d in range(10) for p in range(len(t2i.PHRASINGS))}
        assert set(split.inputs["prompt"][:60]) == every  # all phrasings of all digits
    pairs = set(zip(calibration.inputs["prompt"], calibration.inputs["seed"].tolist(), strict=True))
    assert not pairs & set(zip(test.inputs["prompt"], test.inputs["seed"].tolist(), strict=True))
    assert not set(calibration.inputs["seed"].tolist()) & set(test.inputs["seed"].tolist())
    larger = t2i.prompt_splits(calibration=300, test=300)  # a prefix does not move
    assert torch.equal(larger["test"].inputs["seed"][:60], test.inputs["seed"])
    other = t2i.prompt_splits(calibration=120, test=60, seed=1)
    assert not torch.equal(other["test"].inputs["seed"], test.inputs["seed"])


def test_untrained_pipeline_generates_offline_and_round_trips(pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    prompts, seeds = ["a handwritten digit seven", "the number 3"], torch.tensor([11, 12])
    images = t2i.generate(pipe, prompts, seeds, **TINY_CALL)
    assert images.shape == (2, 3, t2i.IMAGE_SIZE, t2i.IMAGE_SIZE)
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, t2i.generate(pipe, prompts, seeds, **TINY_CALL))
    assert not torch.equal(images[0], t2i.generate(pipe, prompts[:1], seeds[1:], **TINY_CALL)[0])
    judge = DigitJudge().eval()
    split = t2i.prompt_splits(calibration=0, test=4)["test"]
    expected = t2i.generate(pipe, split.inputs["prompt"], split.inputs["seed"], **TINY_CALL)
    hits = (judge(expected).argmax(1) == split.labels).float().mean().item()
    assert t2i.prompt_adherence(pipe, judge, split, batch_size=3, **TINY_CALL) == hits
    pipe.save_pretrained(str(tmp_path))
    loaded = StableDiffusionPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    assert loaded.safety_checker is None and loaded.tokenizer.model_max_length == t2i.MAX_TOKENS
    assert torch.equal(t2i.generate(loaded, prompts, seeds, **TINY_CALL), images)


def test_judge_contract():
    judge = DigitJudge().eval()
    images = real_digits()["test"].images[:5]
    assert images.shape == (5, 3, t2i.IMAGE_SIZE, t2i.IMAGE_SIZE)
    assert images.min() >= 0 and images.max() <= 1
    with torch.inference_mode():
        features = judge.features(images)
        assert features.shape == (5, DigitJudge.feature_dim) and DigitJudge.feature_dim <= 128
        assert torch.equal(judge(images), judge.head(features))
        assert judge.head(features).shape == (5, 10)


def test_zoo_pipeline_is_trained_once_then_cached(tmp_path, monkeypatch):
    """A tiny recipe (a few steps) goes through the cache path: a save_pretrained folder."""
    monkeypatch.setenv("NNOBF_HOME", str(tmp_path))
    monkeypatch.setattr(t2i, "load_judge", lambda progress=True: DigitJudge().eval())
    monkeypatch.setattr(t2i, "prompt_adherence", lambda pipe, judge, split, **_: 0.5)  # seconds
    recipe = t2i.DiffusionRecipe(vae_steps=2, steps=2)
    pipe, info = t2i.load_zoo_pipeline(progress=False, recipe=recipe)
    assert info["model"] == "sd-digits" and info["recipe"]["steps"] == 2
    assert info["test_prompt_adherence"] == 0.5
    (folder,) = tmp_path.glob("sd-digits-*")  # nothing else left behind (no staging folder)
    assert json.loads((folder / "nnobf_info.json").read_text()) == info
    again, info_again = t2i.load_zoo_pipeline(progress=False, recipe=recipe)
    assert info_again == info
    prompts, seeds = ["handwritten 4"], torch.tensor([3])
    expected = t2i.generate(pipe, prompts, seeds, **TINY_CALL)
    assert torch.equal(t2i.generate(again, prompts, seeds, **TINY_CALL), expected)
    retrained, _ = t2i.load_zoo_pipeline(progress=False, recipe=recipe, retrain=True)
    assert torch.equal(t2i.generate(retrained, prompts, seeds, **TINY_CALL), expected)


@pytest.mark.slow
def test_zoo_pipeline_draws_the_prompted_digits(trained_sd_digits):
    judge = load_judge(progress=False)
    assert evaluate_accuracy(judge, real_digits()["test"]) >= 0.97
    pipe, info = t2i.load_zoo_pipeline(progress=False)
    assert info["test_prompt_adherence"] >= 0.8
    test = t2i.prompt_splits(calibration=0, test=100, seed=1)["test"]  # other seeds
    assert t2i.prompt_adherence(pipe, judge, test) >= 0.8
