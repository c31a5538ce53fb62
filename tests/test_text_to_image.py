"""Tiered diffusers pipelines: determinism, bit-exact full tier, mixed batches, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("diffusers")

from tiny_diffusion import CALL, tiny_pipeline  # noqa: E402

from nnobfuscator import TieredModel, calibrate, obfuscate  # noqa: E402
from nnobfuscator.core.data import Split  # noqa: E402
from nnobfuscator.tasks import TextToImageTask  # noqa: E402
from nnobfuscator.tasks.grid import plot_generation_grid  # noqa: E402
from nnobfuscator.tiered.cost import relative_costs  # noqa: E402

PROMPTS = ["a handwritten digit seven", "a red cat", "digit one", "two"]
SEEDS = torch.tensor([0, 1, 2, 3])


def _generators(seeds: torch.Tensor) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _images(model, prompts=PROMPTS, seeds=SEEDS, **kwargs) -> torch.Tensor:
    return model({"prompt": prompts, "seed": seeds}, output_type="pt", **kwargs).images


@pytest.fixture
def pipe(tmp_path: Path):
    return tiny_pipeline(tmp_path / "parts")


def _tiered(pipe, compute: str | None = "auto") -> TieredModel:
    tiered = obfuscate(
        pipe, tiers="free=60%,pro=85%,premium=full", compute=compute, call_options=CALL
    )
    for tier, strength in (("free", 0.9), ("pro", 0.4)):
        tiered.set_strength(tier, "feature-mix", strength)
        if compute:
            tiered.set_setting(tier, "fewer-steps", {"share": 0.5})
            tiered.set_setting(tier, "guidance-cutoff", {"share": 0.5})
    return tiered


def test_pipeline_is_wrapped_in_place_and_full_tier_is_the_plain_pipeline(pipe) -> None:
    plain = pipe(PROMPTS, generator=_generators(SEEDS), output_type="pt", **CALL).images
    tiered = _tiered(pipe)
    assert tiered.base_model.pipeline is pipe  # wrapped, not copied
    to_k = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    assert type(to_k).__name__ == "TieredLayer"  # the user's pipeline itself is tiered
    assert torch.equal(_images(tiered, tier="premium"), plain)
    free = _images(tiered, tier="free")
    assert (free - plain).abs().mean() > 1e-3
    tiered.unload()
    assert isinstance(
        pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k, nn.Linear
    )
    assert torch.equal(
        pipe(PROMPTS, generator=_generators(SEEDS), output_type="pt", **CALL).images, plain
    )


def test_same_prompt_seed_and_tier_give_the_same_image_in_any_batch(pipe) -> None:
    tiered = _tiered(pipe)
    first = _images(tiered, tier="free")
    again = _images(tiered, tier="free")
    assert torch.equal(first, again)
    # the third prompt alone, or in another batch, gives the same image
    alone = _images(tiered, PROMPTS[2:3], SEEDS[2:3], tier="free")
    torch.testing.assert_close(alone[0], first[2], atol=1e-5, rtol=0)
    other = _images(tiered, [PROMPTS[2], "a red cat"], torch.tensor([2, 9]), tier="free")
    torch.testing.assert_close(other[0], first[2], atol=1e-5, rtol=0)
    assert not torch.allclose(first[0], _images(tiered, tier="free", seeds=SEEDS + 10)[0])


def test_mixed_tiers_in_one_call_equal_per_tier_calls(pipe) -> None:
    tiered = _tiered(pipe)
    tiers = ["free", "premium", "pro", "free"]
    mixed = _images(tiered, tiers=tiers)
    for row, tier in enumerate(tiers):
        alone = _images(tiered, tier=tier)
        torch.testing.assert_close(mixed[row], alone[row], atol=1e-5, rtol=0)
    # per-image generators split with the batch too; PIL output scatters back in order
    pil = tiered(PROMPTS, tiers=tiers, generator=_generators(SEEDS))
    assert len(pil.images) == 4 and pil.images[1].size == (16, 16)


def test_compute_strategies_cut_steps_and_guidance(pipe) -> None:
    tiered = _tiered(pipe)
    batches: list[int] = []

    def count(module: nn.Module, args: tuple) -> None:
        batches.append(args[0].shape[0])  # the UNet's latent batch

    hook = pipe.unet.register_forward_pre_hook(count)
    _images(tiered, tier="premium")
    assert batches == [8] * 4  # 4 steps, guidance doubles the batch of 4
    batches.clear()
    _images(tiered, tier="free")
    assert batches == [8, 4]  # half the steps, guidance for the first half of them
    hook.remove()
    costs = relative_costs(tiered, {"prompt": PROMPTS[:1], "seed": SEEDS[:1]})
    assert costs["premium"] == 1.0 and costs["free"] < 0.5


def test_tiered_pipeline_saves_and_loads_onto_a_pipeline_from_a_directory(pipe, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    tiered = _tiered(pipe)
    expected = {tier: _images(tiered, tier=tier) for tier in tiered.tier_names}
    tiered.save_pretrained(tmp_path / "artifact")
    tiered.unload()
    pipe.save_pretrained(tmp_path / "sd")  # the Stable Diffusion directory layout
    assert (tmp_path / "sd" / "unet" / "config.json").is_file()
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    loaded = TieredModel.from_pretrained(tmp_path / "artifact", reloaded)
    assert loaded.base_model.call_options == CALL
    for tier, images in expected.items():
        torch.testing.assert_close(_images(loaded, tier=tier), images, atol=1e-5, rtol=0)


class _PixelJudge(nn.Module):
    """A fixed random classifier of 16x16 images into 4 classes (for plumbing tests)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.project = nn.Linear(3 * 16 * 16, 8)
        self.classify = nn.Linear(8, 4)
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(images.flatten(1) - 0.5)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(features)


def _labelled(tiered: TieredModel, judge: nn.Module, name: str, seeds: range) -> Split:
    """Prompts whose label is what the judge says of the full tier's image (adherence 1.0)."""
    prompts = [PROMPTS[i % 4] for i in range(len(seeds))]
    inputs = {"prompt": prompts, "seed": torch.tensor(list(seeds))}
    with torch.no_grad():
        labels = judge(_images(tiered, prompts, inputs["seed"], tier="premium")).argmax(1)
    return Split(name, inputs, labels)


def test_calibration_lands_tiers_and_makes_the_free_tier_cheaper(pipe, tmp_path) -> None:
    judge = _PixelJudge().eval()
    judge.forward = lambda images: judge.head(judge.features(images))  # type: ignore[method-assign]
    # A random UNet barely reads its prompt, so the plumbing test mixes all its layers.
    tiered = obfuscate(
        pipe,
        tiers="free=0.85,pro=0.92,premium=full",
        compute="auto",
        call_options=CALL,
        targets=["unet.*"],
        key=b"k" * 32,  # a fixed key: the reachable range depends on the keyed mix
    )
    calibration = _labelled(tiered, judge, "calibration", range(0, 96))
    test = _labelled(tiered, judge, "test", range(1000, 1064))
    task = TextToImageTask(judge, reference=torch.rand(32, 3, 16, 16))
    report = calibrate(tiered, calibration, test, task=task, progress=False)
    assert report["metric"] == "prompt_adherence" and report["task"] == "text-to-image"
    rows = {row["name"]: row for row in report["tiers"]}
    assert rows["premium"]["achieved"]["test"] == 1.0
    for tier, target in (("free", 0.85), ("pro", 0.92)):
        assert abs(rows[tier]["achieved"]["calibration"] - target) <= 0.05
        assert rows[tier]["extra"]["fid_judge"] > 0
    # some compute setting is cheaper than the full one (mixing every layer of this tiny UNet's
    # inputs, 32 features wide, costs about as much again as the steps saved: not compared)
    saved = [tiered.compute[n].setting("free")["share"] for n in ("fewer-steps", "guidance-cutoff")]
    assert min(saved) < 1.0
    grid = plot_generation_grid(tiered, test, tmp_path / "grid.png")
    width, height = Image.open(grid).size
    assert height > 2 * 3 * 40 and width > height  # three tier rows, four prompt columns


def test_bad_uses_get_clear_errors(pipe) -> None:
    with pytest.raises(ValueError, match="needs a judge"):
        TextToImageTask()
    tiered = _tiered(pipe)
    with pytest.raises(ValueError, match="3 seeds for 4 prompts"):
        _images(tiered, seeds=SEEDS[:3], tier="free")
    with pytest.raises(ValueError, match="diffusion pipelines"):
        obfuscate(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), compute="fewer-steps")
    with pytest.raises(TypeError, match="diffusers pipeline"):
        obfuscate(object())


def test_served_pipeline_generates_pngs_per_key_tier(pipe, tmp_path) -> None:
    import io

    import httpx
    import numpy as np
    from PIL import Image

    from nnobfuscator.serving import KeyStore, ServeConfig, create_app
    from nnobfuscator.serving.testing import serve_in_thread

    tiered = _tiered(pipe)
    store = KeyStore(tmp_path / "keys.sqlite")
    free = {"X-API-Key": store.create("free")[1]}
    premium = {"X-API-Key": store.create("premium")[1]}
    owner = {"X-API-Key": store.create(None, owner=True)[1]}
    app = create_app(tiered, keys=store, config=ServeConfig(rate_limits={}, max_prompt_chars=40))

    def png(response: httpx.Response) -> np.ndarray:
        import base64

        data = response.content
        if response.headers["content-type"].startswith("application/json"):
            data = base64.b64decode(response.json()["image"])
        return np.asarray(Image.open(io.BytesIO(data)))

    prompt = {"prompt": "a handwritten digit seven", "seed": 3}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        answers = {
            name: client.post("/v1/generate", headers=h, json=prompt)
            for name, h in (("free", free), ("premium", premium))
        }
        raw = client.post("/v1/generate", headers={**free, "Accept": "image/png"}, json=prompt)
        unseeded = [
            client.post("/v1/generate", headers=free, json={"prompt": "two"}) for _ in range(2)
        ]
        compare = client.post("/v1/compare", headers=owner, json=prompt)
        bad = {
            "empty": client.post("/v1/generate", headers=free, json={"prompt": " "}),
            "long": client.post("/v1/generate", headers=free, json={"prompt": "a" * 41}),
            "number": client.post("/v1/generate", headers=free, json={"prompt": 7}),
            "seed": client.post("/v1/generate", headers=free, json={"prompt": "two", "seed": -1}),
        }
    assert {n: a.headers["X-Tier"] for n, a in answers.items()} == {
        "free": "free",
        "premium": "premium",
    }
    expected = {
        tier: _images(tiered, ["a handwritten digit seven"], torch.tensor([3]), tier=tier)[0]
        for tier in ("free", "premium")
    }
    for tier, answer in answers.items():  # the served image is the tier's own image
        served = torch.tensor(png(answer)).permute(2, 0, 1).float() / 255
        assert (served - expected[tier]).abs().max() <= 1 / 255 + 1e-6
    assert not np.array_equal(png(answers["free"]), png(answers["premium"]))
    assert raw.headers["content-type"] == "image/png" and raw.headers["X-Seed"] == "3"
    np.testing.assert_array_equal(png(raw), png(answers["free"]))
    assert unseeded[0].json()["seed"] == unseeded[1].json()["seed"]  # derived from key + prompt
    np.testing.assert_array_equal(png(unseeded[0]), png(unseeded[1]))
    tiers = [result["tier"] for result in compare.json()["results"]]
    assert compare.status_code == 200 and tiers == ["free", "pro", "premium"]
    assert {name: r.status_code for name, r in bad.items()} == dict.fromkeys(bad, 422)
    assert bad["empty"].json()["error"] == "empty_prompt"
    assert bad["long"].json()["error"] == "prompt_too_long"


def test_artifact_with_a_pipeline_directory_source_serves_the_same_images(pipe, tmp_path) -> None:
    from nnobfuscator.serving.served_model import load_artifact

    pipe.save_pretrained(tmp_path / "sd")
    source = {"model": {"diffusers": str(tmp_path / "sd")}}
    tiered = obfuscate(
        pipe, tiers="free=60%,premium=full", call_options=CALL, meta={"source": source}
    )
    tiered.set_strength("free", "feature-mix", 0.7)
    tiered.save_pretrained(tmp_path / "artifact")
    served = load_artifact(tmp_path / "artifact")
    assert served.task == "text-to-image" and served.takes_seed
    assert served.model.base_model.pipeline is not pipe  # rebuilt from the directory
    for tier in ("free", "premium"):
        torch.testing.assert_close(
            _images(served.model, tier=tier), _images(tiered, tier=tier), atol=1e-5, rtol=0
        )


@pytest.mark.slow
def test_cli_text_to_image_demo_lands_tiers_and_writes_the_grid(
    tmp_path, trained_sd_digits
) -> None:
    import json
    from importlib.resources import files

    import jsonschema
    from typer.testing import CliRunner

    from nnobfuscator.cli import app

    out = tmp_path / "sd"
    result = CliRunner().invoke(
        app, ["demo", "--task", "text-to-image", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    schema = json.loads(files("nnobfuscator").joinpath("contracts/report.schema.json").read_text())
    jsonschema.validate(report, schema)
    assert report["metric"] == "prompt_adherence" and report["task"] == "text-to-image"
    rows = {row["name"]: row for row in report["tiers"]}
    assert rows["premium"]["achieved"]["test"] >= 0.8
    for tier in ("free", "pro"):
        gap = rows[tier]["extra"]["target_gap"]
        assert abs(gap) <= max(0.05, rows[tier]["extra"]["two_se"])
    assert rows["free"]["relative_cost"] <= 0.5
    assert (out / "grid.png").is_file() and "grid:" in result.output
