"""Tiers that withhold: answer formats, class merging with per-tier readouts, extractable utility."""

from __future__ import annotations

import pytest
import torch
from conftest import BUILDERS, trained
from invariants import check_invariants

from nnobfuscator import CalibrationError, calibrate, obfuscate, parse_tiers
from nnobfuscator.core.answers import AnswerFormat
from nnobfuscator.extraction.extract import CopyRecipe, extract, labels_only
from nnobfuscator.strategies.class_merge import MASKED, groups_at, merge_order

KEY = bytes(range(32))
TIERS = "free=60%,pro=85%,premium=full"


# --- answer formats ------------------------------------------------------------------------------
def test_answer_formats_parse_and_show_only_what_they_allow() -> None:
    probabilities = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.7, 0.15, 0.1, 0.05]])
    scores, top2, top1, label = (AnswerFormat.parse(s) for s in ("scores", "top2", "top1", "label"))
    assert AnswerFormat.parse("top_k:2") == top2 and top2.spec == "top_k:2"
    assert torch.equal(scores.view(probabilities), probabilities)
    assert torch.equal(
        top2.view(probabilities), torch.tensor([[0, 0.5, 0, 0.25], [0.7, 0.15, 0, 0]])
    )
    assert torch.equal(top1.view(probabilities), torch.tensor([[0, 0.5, 0, 0], [0.7, 0, 0, 0]]))
    assert torch.equal(label.view(probabilities), torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0]]))
    targets = top1.targets(probabilities)  # the mass not shown spreads over the other classes
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(targets[0], torch.tensor([0.5 / 3, 0.5, 0.5 / 3, 0.5 / 3]))
    for bad in ("top0", "top_k:x", "probabilities", ""):
        with pytest.raises(ValueError, match="answer format"):
            AnswerFormat.parse(bad)


def test_tier_specs_carry_answer_formats_with_defaults() -> None:
    free, pro, premium = parse_tiers("free=60%:label,pro=85%@0.6:top_k:3,premium=full")
    assert (free.format.spec, pro.format.spec, premium.format.spec) == (
        "label",
        "top_k:3",
        "scores",
    )
    assert pro.max_cost == 0.6
    assert parse_tiers("free=60%,premium=full")[0].format.spec == "top_k:5"
    listed = parse_tiers([{"name": "a", "target": 0.5, "answer_format": "top1"}])
    assert listed[0].to_dict()["answer_format"] == "top1"
    with pytest.raises(ValueError, match="answer format"):
        parse_tiers("free=60%:everything,premium=full")


# --- class merging -------------------------------------------------------------------------------
def test_merge_order_joins_the_most_confused_groups_first() -> None:
    # classes 0 and 1 are confused often, then {0,1} with 2; class 3 is never confused
    labels = torch.tensor([0] * 10 + [1] * 8 + [2] * 10 + [3] * 10)
    predicted = labels.clone()
    predicted[[0, 1, 2, 3]] = 1  # four 0s read as 1
    predicted[[10, 11]] = 0  # two 1s read as 0
    predicted[[18, 19]] = 0  # two 2s read as 0
    order = merge_order(predicted, labels, 4)
    assert order.tolist()[0] == [1, 0]  # 1 joins 0 (the larger class names the group)
    assert order.tolist()[1] == [2, 0]
    assert groups_at(order, 4, 2).tolist() == [0, 0, 0, 3]
    assert groups_at(order, 4, 3).unique().numel() == 1


@pytest.fixture(scope="module")
def merged(trained_weights, digits8):
    tiered = obfuscate(
        trained("resnet", trained_weights), tiers=TIERS, strategy="class-merge", key=KEY
    )
    report = calibrate(tiered, digits8["calibration"], digits8["test"], progress=False)
    return tiered, report


def test_class_merge_is_the_default_for_classifiers(trained_weights) -> None:
    tiered = obfuscate(trained("resnet", trained_weights), tiers=TIERS, key=KEY)
    assert list(tiered.degrading) == ["class-merge"]
    assert list(tiered.strategies["class-merge"].layers) == ["fc"]


def test_class_merge_lands_targets_and_lower_tiers_answer_fewer_classes(merged, digits8) -> None:
    tiered, report = merged
    rows = {row["name"]: row for row in report["tiers"]}
    for name in ("free", "pro"):
        assert abs(rows[name]["achieved"]["calibration"] - rows[name]["target"]) < 0.03
        assert rows[name]["answer_format"] == "top_k:5" and rows[name]["strategy"] == "class-merge"
    with torch.inference_mode():
        answered = {
            tier: tiered(digits8["test"].images, tier=tier).argmax(dim=1).unique().numel()
            for tier in ("free", "pro", "premium")
        }
        free = tiered(digits8["test"].images, tier="free")
    assert answered["free"] < answered["pro"] <= answered["premium"] == 10
    strategy = tiered.strategies["class-merge"]
    whole, _ = strategy.level("free")
    dropped = strategy.order[:whole, 0]
    assert (free[:, dropped] <= MASKED / 2).all()  # merged-away classes are never answered


def test_class_merge_keeps_the_invariants(merged, digits8, trained_weights, tmp_path) -> None:
    tiered, _ = merged
    x = digits8["test"].images[:12]
    with torch.inference_mode():
        expected = trained("resnet", trained_weights)(x)
        torch.testing.assert_close(tiered(x[3:4], tier="free"), tiered(x, tier="free")[3:4])
    check_invariants(
        tiered,
        x,
        expected_full=expected,
        rebuild=lambda: trained("resnet", trained_weights),
        tmp_path=tmp_path,
        key=KEY,
        unload=False,  # the module's fixture is shared
    )
    plain = trained("resnet", trained_weights)
    again = obfuscate(plain, tiers=TIERS, strategy="class-merge", key=KEY)
    assert again.unload() is plain and isinstance(plain.fc, torch.nn.Linear)


def test_class_merge_needs_a_linear_head() -> None:
    squeeze = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ValueError, match="no nn.Linear head"):
        obfuscate(squeeze, tiers=TIERS, strategy="class-merge", key=KEY)


# --- extractable utility -------------------------------------------------------------------------
def test_a_merged_tier_gives_no_more_than_it_shows_and_a_noisy_one_does(
    merged, trained_weights, digits8
) -> None:
    """Decoding the answers of a class-merge tier gains far less over its face value than
    decoding a logit-noise tier at the same target (which only renames)."""
    pool = digits8["train"]
    tiered, _ = merged
    (withheld,) = extract(tiered, "free", pool, digits8["test"], queries=[200], progress=False)
    assert withheld.answer_format == "top_k:5" and withheld.knockoff is None
    noisy = obfuscate(
        trained("resnet", trained_weights), tiers=TIERS, strategy="logit-noise", key=KEY
    )
    calibrate(noisy, digits8["calibration"], digits8["test"], progress=False)
    (renamed,) = extract(noisy, "free", pool, digits8["test"], queries=[200], progress=False)
    assert renamed.decode > renamed.face + 0.15
    assert withheld.decode - withheld.face < (renamed.decode - renamed.face) / 2


def test_knockoff_and_labels_only_train_copies(merged, digits8) -> None:
    tiered, _ = merged
    recipe = CopyRecipe(epochs=1, lr=5e-3, batch_size=64)
    pool = digits8["train"]
    baseline = labels_only(
        pool, digits8["test"], [100], build_copy=BUILDERS["resnet"], recipe=recipe, progress=False
    )
    assert set(baseline[100]) == {"pixels", "scratch", "value"}
    (found,) = extract(
        tiered,
        "pro",
        pool,
        digits8["test"],
        queries=[100],
        answer_format="label",
        build_copy=BUILDERS["resnet"],
        recipe=recipe,
        baseline=baseline,
        progress=False,
    )
    assert found.knockoff is not None and 0.0 < found.knockoff <= 1.0
    assert found.value == max(found.face, found.decode, found.knockoff)
    assert found.labels_only == baseline[100]["value"]


def test_calibrating_against_extractable_refuses_a_tier_that_only_renames(
    trained_weights, digits8
) -> None:
    """Feature mixing answering full scores renames what the model knows: 40 labels decode
    it far above its target, however strong calibration sets it within 3 points of its
    target. Class merging holds, measured on the test split within its sampling error."""

    def against_extractable(model):
        return calibrate(
            model,
            digits8["calibration"],
            digits8["test"],
            against="extractable",
            queries=[40],
            pool=digits8["train"],
            progress=False,
        )

    renaming = obfuscate(
        trained("resnet", trained_weights),
        tiers="free=60%:scores,pro=85%:scores,premium=full",
        strategy="feature-mix",
        key=KEY,
    )
    with pytest.raises(CalibrationError, match="over its bound"):
        against_extractable(renaming)
    report = against_extractable(
        obfuscate(trained("resnet", trained_weights), tiers=TIERS, key=KEY)
    )
    two_se = 2 * (0.25 / len(digits8["test"])) ** 0.5
    for row in report["tiers"][:2]:
        found = row["extractable"]["40"]
        assert found["value"] <= max(row["target"], found["labels_only"]) + 0.03 + two_se
        assert row["achieved"]["test"] >= row["target"] - 0.03 - two_se


def test_class_merge_at_strength_zero_answers_like_the_model(digits8, trained_weights) -> None:
    """Without a compute change and with no merge, a tier answers through the model's own head
    (a readout fitted again could only lose what the head learned)."""
    plain = trained("resnet", trained_weights)
    tiered = obfuscate(trained("resnet", trained_weights), tiers=TIERS, key=KEY)
    strategy = tiered.strategies["class-merge"]
    cal, x = digits8["calibration"], digits8["test"].images[:16]
    tiered.set_strength("pro", "class-merge", 0.0)
    with torch.no_grad():
        strategy.fit_order(plain(cal.images).argmax(dim=1), cal.labels, 10)
        features = strategy.head_inputs(lambda: tiered(cal.images, tier="pro"))
    strategy.fit_tier("pro", features, cal.labels)
    with torch.inference_mode():
        torch.testing.assert_close(tiered(x, tier="pro"), plain(x))
        tiered.set_strength("pro", "class-merge", 1.0 / 9)  # one merge: a fitted readout
        assert not torch.allclose(tiered(x, tier="pro"), plain(x))
