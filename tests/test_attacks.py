"""The attack suite against served tiers, robust logit noise, and `nnobf attack` / `serve`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import trained
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from nnobfuscator import obfuscate
from nnobfuscator.cli import app
from nnobfuscator.core.data import Split
from nnobfuscator.extraction.augment import JITTER, AugmentConfig, random_perturbations
from nnobfuscator.extraction.decode import decode
from nnobfuscator.extraction.distill import TrainRecipe, distill, draw_queries
from nnobfuscator.security.attacks import (
    augment_and_vote,
    repeat_and_vote,
    run_attacks,
    tier_baseline,
)
from nnobfuscator.serving.testing import calibrated_by_hand

KEY = bytes(range(32))
runner = CliRunner()


def tiered_cnn(weights, strategy: str, strength: float):
    tiered = obfuscate(
        trained("cnn", weights), tiers="free=0.5,premium=full", strategy=strategy, key=KEY
    )
    tiered.set_strength("free", strategy, strength)
    return tiered


def test_repeat_and_vote_gains_nothing_on_keyed_tiers_and_beats_aim_noise(trained_weights, digits8):
    test = digits8["test"]
    for strategy in ("logit-noise", "feature-mix"):
        tiered = tiered_cnn(trained_weights, strategy, 2.0 if strategy == "logit-noise" else 0.6)
        results = repeat_and_vote(tiered, test, budget=5, progress=False)
        assert [r.attack for r in results] == ["repeat-vote", "repeat-mean"]
        assert results[0].single < results[0].full - 0.1  # the tier is really lowered
        assert all(r.gain == 0.0 for r in results)
    torch.manual_seed(0)
    aim = tiered_cnn(trained_weights, "aim-noise", 2.0)
    vote, mean = repeat_and_vote(aim, test, budget=15, progress=False)
    assert vote.single < vote.full - 0.1
    assert vote.gain > 0.1 and mean.gain > 0.1


def test_classification_copies_keep_shape_and_flips_follow_the_config(digits8):
    images = digits8["test"].images[:6]
    changes = random_perturbations(12, (8, 8), AugmentConfig(flips=False), seed=3)
    assert changes[0].apply(images).equal(images)  # the first copy is the original
    assert not any(c.flip for c in changes) and any(c.angle != 0 for c in changes)
    for change in changes[1:]:
        copy = change.apply(images)
        assert copy.shape == images.shape and not copy.equal(images)
        assert (copy - images).abs().mean() < images.abs().mean()  # a small change
    again = random_perturbations(12, (8, 8), AugmentConfig(flips=False), seed=3)
    assert again == changes
    flipping = random_perturbations(12, (8, 8), AugmentConfig(), seed=3)
    assert any(c.flip for c in flipping)


def test_segmentation_copies_map_back_onto_the_original_pixels():
    maps = torch.randn(2, 4, 12, 10)
    config = AugmentConfig(max_shift=0.25, noise=0.0)
    changes = random_perturbations(16, (12, 10), config, invertible=True, seed=1)
    assert all(c.is_invertible for c in changes) and any(c.flip for c in changes)
    for change in changes:
        valid = change.valid(12, 10)
        dx, dy = change.shift
        assert int(valid.sum()) == (12 - abs(dy)) * (10 - abs(dx))
        back = change.invert(change.apply_geometry(maps))
        assert back[..., valid].equal(maps[..., valid])
        assert (back[..., ~valid] == 0).all()
        assert change.apply(maps).shape == maps.shape


class PixelClassifier(nn.Module):
    """Per-pixel logits from 1x1 convolutions: exactly shift- and flip-equivariant."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.body(x)}


def test_augment_and_vote_maps_segmentation_scores_back():
    """An equivariant segmenter answers every shifted or flipped copy alike once its scores are
    mapped back, so voting over noise-free copies gives exactly the single-query mIoU."""
    tiered = obfuscate(
        PixelClassifier(),
        tiers="free=0.5,premium=full",
        strategy="logit-noise",
        key=KEY,
        task="segmentation",
    )
    tiered.set_strength("free", "logit-noise", 1.0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 16, 16, generator=generator)
    split = Split("test", images, torch.randint(0, 4, (6, 16, 16), generator=generator))
    config = AugmentConfig(max_shift=0.2, noise=0.0)
    vote, mean = augment_and_vote(
        tiered, split, tier="premium", budget=9, augment=config, progress=False
    )
    assert 0.1 < vote.single < 0.5
    assert vote.attacked == pytest.approx(vote.single, abs=1e-6)
    assert mean.attacked == pytest.approx(vote.single, abs=1e-6)


@torch.inference_mode()
def test_robust_logit_noise_is_the_same_for_a_slightly_changed_copy(trained_weights, digits8):
    tiered = tiered_cnn(trained_weights, "logit-noise", 2.0)
    x = digits8["test"].images[:64]
    copy = random_perturbations(2, (8, 8), JITTER, seed=0)[1].apply(x)
    clean, clean_copy = tiered(x, tier="premium"), tiered(copy, tier="premium")
    top, top_copy = clean.topk(2, dim=1).indices, clean_copy.topk(2, dim=1).indices
    same = (top == top_copy).all(dim=1)  # the clean prediction and runner-up are unchanged
    assert same.float().mean() > 0.8 and not torch.equal(clean, clean_copy)

    def unit_noise(inputs, reference):
        return (tiered(inputs, tier="free") - reference) / reference.std(dim=1, keepdim=True)

    noise, noise_copy = unit_noise(x, clean), unit_noise(copy, clean_copy)
    torch.testing.assert_close(noise[same], noise_copy[same], rtol=1e-4, atol=1e-4)
    # the predicted class always loses ground to the runner-up
    assert (noise.gather(1, top[:, :1]) < noise.gather(1, top[:, 1:])).all()
    other = int((top[:, 0] != top[0, 0]).nonzero()[0, 0])
    assert not torch.allclose(noise[0], noise[other])  # another predicted class, other noise
    free = tiered(x, tier="free").argmax(1)
    flipped = free != top[:, 0]
    # mistakes are the model's own second choice (the keyed part rarely picks a third class)
    assert flipped.any() and (free[flipped] == top[flipped, 1]).float().mean() > 0.8


def test_jitter_and_augment_gain_little_on_robust_logit_noise(trained_weights, digits8):
    tiered = tiered_cnn(trained_weights, "logit-noise", 2.0)
    test = digits8["test"]
    baseline = tier_baseline(tiered, test, "free")
    for name, config in (("jitter", JITTER), ("augment", AugmentConfig(flips=False))):
        results = augment_and_vote(
            tiered, test, budget=9, augment=config, name=name, baseline=baseline, progress=False
        )
        assert all(r.gain < 0.03 for r in results), [(r.attack, r.gain) for r in results]


def test_distill_and_decode_on_a_tiny_classifier(trained_weights, digits8):
    from conftest import BUILDERS

    tiered = tiered_cnn(trained_weights, "feature-mix", 0.6)
    pool, test = digits8["train"], digits8["test"]
    queries = draw_queries(pool, 1000, seed=0)
    assert len(queries) == 1000  # the pool's 900 images, then 100 changed copies
    assert queries.labels[:900].sort().values.equal(pool.labels.sort().values)
    recipe = TrainRecipe(lr=1e-2, batch_size=32, steps=30)
    first = distill(
        tiered,
        pool,
        test,
        build_copy=BUILDERS["cnn"],
        queries=(60,),
        recipe=recipe,
        progress=False,
    )
    again = distill(
        tiered,
        pool,
        test,
        build_copy=BUILDERS["cnn"],
        queries=(60,),
        recipe=recipe,
        progress=False,
    )
    (result,) = first
    assert result.attack == "distill" and result.budget == 60
    assert 0.0 <= result.attacked <= 1.0 and result.reference is not None
    assert 0.0 < result.details["answer_accuracy"] < 1.0
    assert result.to_dict() == again[0].to_dict()  # seeded
    decoded = {r.attack: r for r in decode(tiered, pool, test, queries=(300,), progress=False)}
    # a deterministic tier keeps what tells the classes apart: scores decode, labels do not
    assert decoded["decode-scores"].gain > 0.1
    assert decoded["decode-label"].gain < decoded["decode-scores"].gain


def test_attacks_refuse_what_they_do_not_cover(trained_weights, digits8):
    tiered = tiered_cnn(trained_weights, "logit-noise", 1.0)
    test = digits8["test"]
    with pytest.raises(ValueError, match="unknown attacks.*repeat"):
        run_attacks(tiered, test, attacks=["repeat", "guess"])
    with pytest.raises(ValueError, match="budget"):
        run_attacks(tiered, test, attacks=["repeat"], budget=1)
    with pytest.raises(ValueError, match="unknown tier 'gold'"):
        run_attacks(tiered, test, attacks=["repeat"], tiers=["gold"])
    with pytest.raises(ValueError, match="distill needs a pool"):
        run_attacks(tiered, test, attacks=["distill"])
    with pytest.raises(ValueError, match="at least 10"):
        run_attacks(tiered, test, attacks=["decode"], pool=digits8["train"], queries=[5])
    tiered.task = "text-to-image"
    with pytest.raises(ValueError, match="attacks cover classification and segmentation"):
        run_attacks(tiered, test)


# --- the command line ----------------------------------------------------------------------
def _rgb_folder(root, images, labels) -> None:
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).convert("RGB").save(
            folder / f"{index}.png"
        )


def _artifact(root, strategy: str):
    """A torchvision mobilenet_v3_small (random weights) on 16x16 RGB digit folders, tiered and
    saved with a source that `nnobf attack` rebuilds."""
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits
    from torchvision.models import mobilenet_v3_small

    from nnobfuscator import InputSpec

    digits = load_digits()
    for name, index in {"cal": range(0, 120), "test": range(1000, 1100)}.items():
        if not (root / name).is_dir():
            _rgb_folder(root / name, digits.images[list(index)], digits.target[list(index)])
    torch.manual_seed(0)
    base = mobilenet_v3_small(num_classes=10).eval()
    save_file(
        {k: v.contiguous() for k, v in base.state_dict().items()}, str(root / "w.safetensors")
    )
    data = {"calibration": str(root / "cal"), "test": str(root / "test"), "image_size": 16}
    weights = str(root / "w.safetensors")
    source = {
        "model": {"arch": "mobilenet_v3_small", "weights": weights, "num_classes": 10},
        "data": {**data, "mean": [0.3] * 3, "std": [0.38] * 3},
    }
    tiered = obfuscate(
        base,
        tiers="free=60%,pro=85%,premium=full",
        strategy=strategy,
        key=KEY,
        model_name="mobilenet_v3_small",
        input_spec=InputSpec(3, 16, 16),
        meta={"source": source},
    )
    top = tiered.strategies[strategy].max_strength
    calibrated_by_hand(tiered, {"free": 0.25 * top, "pro": 0.1 * top})
    tiered.save_pretrained(str(root / strategy))
    return root / strategy


def test_attack_cli_end_to_end_writes_a_sane_report(tmp_path):
    artifact = _artifact(tmp_path, "logit-noise")
    command = ["attack", str(artifact), "--budget", "3", "--queries", "20", "--quiet"]
    result = runner.invoke(app, [*command, "--train-steps", "2"])
    assert result.exit_code == 0, result.output
    for word in ("repeat-vote", "augment-mean", "decode-scores", "distill", "free", "gain"):
        assert word in result.output
    report = json.loads((artifact / "attack-report.json").read_text())
    assert (artifact / "attacks.png").read_bytes()[:4] == b"\x89PNG"
    assert report["metric"] == "accuracy" and report["splits"] == {"test": 100, "query_pool": 120}
    assert report["settings"]["tiers"] == ["free"] and report["settings"]["budget"] == 3
    assert report["settings"]["augment"]["flips"] is True  # not the zoo's digits
    assert report["settings"]["recipe"]["steps"] == 2
    assert report["strategies"] == {"free": "logit-noise"} and report["weak_strategies"] == []
    attacks = [(row["attack"], row["budget"]) for row in report["results"]]
    assert attacks == [
        ("repeat-vote", 3),
        ("repeat-mean", 3),
        ("jitter-vote", 3),
        ("jitter-mean", 3),
        ("augment-vote", 3),
        ("augment-mean", 3),
        ("distill", 20),
        ("decode-scores", 20),
        ("decode-label", 20),
        ("extract", 20),
    ]
    for row in report["results"]:
        assert row["tier"] == "free"
        for field in ("single", "attacked", "full"):
            assert 0.0 <= row[field] <= 1.0
        assert row["gain"] == pytest.approx(row["attacked"] - row["single"])
        if row["attack"].startswith("repeat"):
            assert row["gain"] == 0.0
        if row["attack"] in ("distill", "decode-scores", "decode-label", "extract"):
            assert 0.0 <= row["reference"] <= 1.0
    out = tmp_path / "elsewhere"
    result = runner.invoke(
        app,
        [
            *command[:2],
            *("--attacks", "repeat", "--tier", "all", "--report", str(out / "r.json")),
            *("--plot", str(out / "p.png"), "--quiet"),
        ],
    )
    assert result.exit_code == 0, result.output
    again = json.loads((out / "r.json").read_text())
    assert again["settings"]["tiers"] == ["free", "pro"] and (out / "p.png").is_file()
    assert {row["tier"] for row in again["results"]} == {"free", "pro"}


def test_attack_cli_errors_teach(tmp_path):
    artifact = _artifact(tmp_path, "feature-mix")
    cases = {
        ("--attacks", "repeat,guess"): "unknown attacks ['guess']",
        ("--budget", "1"): "budget",
        ("--queries", "300,x"): "--queries must be integers",
        ("--tier", "gold"): "unknown tier 'gold'",
    }
    for options, message in cases.items():
        result = runner.invoke(app, ["attack", str(artifact), *options, "--quiet"])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, ["attack", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not an artifact directory" in result.output


def test_serve_refuses_a_weak_strategy_unless_allowed(tmp_path, monkeypatch):
    import uvicorn

    artifact = _artifact(tmp_path, "aim-noise")
    result = runner.invoke(app, ["serve", str(artifact), "--keys", str(tmp_path / "k.sqlite")])
    assert result.exit_code == 2
    for words in ("aim-noise", "weak", "nnobf attack", "--allow-weak"):
        assert words in result.output
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda server, **options: served.append(server))
    result = runner.invoke(
        app, ["serve", str(artifact), "--keys", str(tmp_path / "k.sqlite"), "--allow-weak"]
    )
    assert result.exit_code == 0, result.output
    assert served and "warning" in result.output
