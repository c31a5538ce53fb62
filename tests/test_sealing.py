"""Sealed bundles and key storage: no key in plain anywhere, each key restores its tier exactly,
a lower key never opens a higher tier, and wrong keys or tampered files fail loudly."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import BUILDERS, tiny_cnn
from safetensors.torch import load_file

from nnobfuscator import TieredModel, obfuscate
from nnobfuscator.core.key_derivation import key_id
from nnobfuscator.core.secret_key import (
    ENCRYPTED_KEY_NAME,
    KEY_ENV,
    KeyNotFoundError,
    key_ring,
)
from nnobfuscator.security.sealing import (
    SEALED_NAME,
    WEIGHTS_NAME,
    SealError,
    TierKey,
    seal,
    unseal,
    unseal_state_dict,
)

KEY = bytes(range(32))
BUILDERS_RESNET = BUILDERS["resnet"]
STRENGTHS = {"free": 0.9, "basic": 0.6, "pro": 0.3}


def calibrated(strategy: str = "feature-mix") -> TieredModel:
    tiered = obfuscate(
        tiny_cnn(), tiers="free=0.3,basic=0.5,pro=0.7,premium=full", key=KEY, strategy=strategy
    )
    for tier, strength in STRENGTHS.items():
        tiered.set_strength(tier, strategy, strength)
    return tiered


@pytest.fixture
def inputs():
    return torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def sealed(tmp_path):
    return seal(calibrated(), tmp_path / "bundle")


def files_hold_no_key(directory, key: bytes) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert key not in data and key.hex().encode() not in data, path


def test_artifact_keeps_its_key_out_of_its_files(tmp_path, inputs):
    tiered = calibrated()
    tiered.save_pretrained(tmp_path / "art")
    files_hold_no_key(tmp_path / "art", KEY)
    ring_file = key_ring() / f"{key_id(KEY)}.key"
    assert ring_file.is_file() and (ring_file.stat().st_mode & 0o777) == 0o600
    loaded = TieredModel.from_pretrained(tmp_path / "art", tiny_cnn())
    assert torch.equal(loaded(inputs, tier="free"), tiered(inputs, tier="free"))


def test_key_sources_passphrase_environment_and_refusals(tmp_path, inputs, monkeypatch):
    tiered = calibrated()
    tiered.save_pretrained(tmp_path / "art", passphrase="correct horse")
    files_hold_no_key(tmp_path / "art", KEY)
    assert (tmp_path / "art" / ENCRYPTED_KEY_NAME).is_file()
    (key_ring() / f"{key_id(KEY)}.key").unlink()  # another server: no key ring entry
    with pytest.raises(KeyNotFoundError, match="NNOBF_PASSPHRASE"):
        TieredModel.from_pretrained(tmp_path / "art", tiny_cnn())
    with pytest.raises(KeyNotFoundError, match="wrong passphrase"):
        TieredModel.from_pretrained(tmp_path / "art", tiny_cnn(), passphrase="wrong")
    loaded = TieredModel.from_pretrained(tmp_path / "art", tiny_cnn(), passphrase="correct horse")
    assert torch.equal(loaded(inputs, tier="pro"), tiered(inputs, tier="pro"))
    monkeypatch.setenv(KEY_ENV, bytes(32).hex())
    with pytest.raises(KeyNotFoundError, match="key of another model"):
        TieredModel.from_pretrained(tmp_path / "art", tiny_cnn())
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    loaded = TieredModel.from_pretrained(tmp_path / "art", tiny_cnn())
    assert torch.equal(loaded(inputs, tier="basic"), tiered(inputs, tier="basic"))


def test_shipped_weights_are_the_lowest_tier_without_any_key(sealed, inputs):
    files_hold_no_key(sealed.directory, KEY)
    plain = tiny_cnn()
    plain.load_state_dict(load_file(str(sealed.directory / WEIGHTS_NAME)))
    # the served tier mixes activations, the shipped weights hold the mix folded in: equal up to
    # float rounding
    torch.testing.assert_close(plain(inputs), calibrated()(inputs, tier="free"))
    assert not torch.allclose(plain(inputs), tiny_cnn()(inputs))
    assert list(sealed.keys) == ["basic", "pro", "premium"]
    for key in sealed.keys.values():  # keys are printed once, never written
        files_hold_no_key(sealed.directory, TierKey.parse(key).secret)


def test_each_key_restores_its_tier_and_the_tiers_below(sealed, inputs):
    served = calibrated()
    for tier, key in sealed.keys.items():
        restored = unseal(sealed.directory, tiny_cnn(), key)
        torch.testing.assert_close(restored(inputs), served(inputs, tier=tier), msg=tier)
    premium = sealed.keys["premium"]
    for lower in ("free", "basic", "pro"):
        restored = unseal(sealed.directory, tiny_cnn(), premium, tier=lower)
        torch.testing.assert_close(restored(inputs), served(inputs, tier=lower), msg=lower)
    assert torch.equal(unseal(sealed.directory, tiny_cnn(), premium)(inputs), tiny_cnn()(inputs))


def test_a_lower_key_cannot_open_a_higher_tier(sealed):
    with pytest.raises(SealError, match="not 'pro'"):
        unseal_state_dict(sealed.directory, sealed.keys["basic"], tier="pro")
    # Nor by forging: the basic key's secret, relabelled as pro, fails the check value.
    forged = TierKey("pro", TierKey.parse(sealed.keys["basic"]).secret)
    with pytest.raises(SealError, match="does not belong"):
        unseal_state_dict(sealed.directory, str(forged))


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda k: k[:-5], "truncated or mistyped"),
        (lambda k: k.replace("nnobftk", "nnobfxx"), "not a tier key"),
        (lambda k: k[:20] + ("A" if k[20] != "A" else "B") + k[21:], "truncated or mistyped"),
    ],
)
def test_malformed_keys_are_refused(sealed, mangle, message):
    with pytest.raises(SealError, match=message):
        unseal_state_dict(sealed.directory, mangle(sealed.keys["pro"]))


def test_a_key_of_another_seal_or_model_is_refused(sealed, tmp_path):
    other = seal(calibrated(), tmp_path / "again")  # same model, new salt: other keys
    with pytest.raises(SealError, match="does not belong"):
        unseal_state_dict(sealed.directory, other.keys["pro"])
    two_tiers = obfuscate(tiny_cnn(), tiers="cheap=0.3,best=full", key=KEY, strategy="feature-mix")
    two_tiers.set_strength("cheap", "feature-mix", 0.9)
    foreign = seal(two_tiers, tmp_path / "foreign")
    with pytest.raises(SealError, match="does not have"):
        unseal_state_dict(sealed.directory, foreign.keys["best"])


def test_tampering_is_detected(sealed):
    directory = sealed.directory
    manifest = json.loads((directory / "bundle.json").read_text())
    manifest["tiers"][2]["metrics"] = {"test": 0.99}
    (directory / "bundle.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(SealError, match="changed after sealing"):
        unseal_state_dict(directory, sealed.keys["pro"])


def test_tampered_weights_and_sealed_material_are_detected(sealed):
    directory = sealed.directory
    blobs = load_file(str(directory / SEALED_NAME))
    from safetensors.torch import save_file

    blobs["tier.pro"][40] ^= 1
    save_file(blobs, str(directory / SEALED_NAME))
    with pytest.raises(SealError, match="changed after sealing"):
        unseal_state_dict(directory, sealed.keys["pro"])
    weights = load_file(str(directory / WEIGHTS_NAME))
    first = next(iter(weights))
    weights[first] = weights[first] + 1e-3
    save_file(weights, str(directory / WEIGHTS_NAME))
    with pytest.raises(SealError, match="changed after sealing"):
        unseal_state_dict(directory, sealed.keys["premium"])


def test_run_time_strategies_cannot_be_sealed(tmp_path):
    tiered = obfuscate(tiny_cnn(), tiers="free=0.3,premium=full", key=KEY, strategy="logit-noise")
    tiered.set_strength("free", "logit-noise", 2.0)
    with pytest.raises(SealError, match="cannot be written into plain weights"):
        seal(tiered, tmp_path / "b")
    assert not os.path.exists(tmp_path / "b" / WEIGHTS_NAME)


def test_compute_tiers_seal_and_ship_only_what_the_lowest_tier_runs(
    tmp_path, trained_weights, digits8
):
    """A class-merge model with block-skip and input-resolution tiers: the shipped weights run
    the lowest tier as a plain module (skipped blocks are zeros, the head is its readout), and a
    key restores its tier's blocks."""
    from conftest import trained

    from nnobfuscator import calibrate
    from nnobfuscator.strategies.input_resolution import resize_input

    tiered = obfuscate(
        trained("resnet", trained_weights),
        tiers="free=45%,pro=80%,premium=full",
        compute="block-skip+input-resolution",
        key=KEY,
    )
    calibrate(tiered, digits8["calibration"], digits8["test"], progress=False)
    bundle = seal(tiered, tmp_path / "bundle")
    manifest = json.loads((bundle.directory / "bundle.json").read_text())
    free, pro = manifest["tiers"][0], manifest["tiers"][1]
    skipped = tiered.tiers["free"].params["block-skip"]["skip"]
    assert skipped and {k.rsplit(".", 2)[0] for k in free["withheld"]} >= set(skipped)
    shipped = load_file(str(bundle.directory / WEIGHTS_NAME))
    assert all(
        not shipped[k].any() for k in free["withheld"] if not k.endswith("running_var")
    )  # nothing of a skipped block travels in plain
    merge = tiered.strategies["class-merge"]
    tiered.set_strength("free", "class-merge", free["merges"] / (merge.classes - 1))
    x = digits8["test"].images[:16]
    plain = BUILDERS_RESNET()
    plain.load_state_dict(shipped)
    scale = float(free.get("input_scale", 1.0))
    with torch.inference_mode():
        torch.testing.assert_close(
            plain.eval()(resize_input(x, scale)), tiered(x, tier="free"), rtol=1e-4, atol=1e-4
        )
    restored = unseal(bundle.directory, BUILDERS_RESNET(), bundle.keys["pro"])
    for name in set(skipped) - set(tiered.tiers["pro"].params["block-skip"]["skip"]):
        weight = restored.get_submodule(name).conv1.weight
        assert torch.equal(weight, tiered.base_model.get_submodule(name).conv1.weight)
    assert pro["merges"] < free["merges"]


def test_clipping_and_outlier_replacement_act_on_each_weight_tensor():
    from nnobfuscator.security.weight_attacks import clip_weights, replace_outliers

    model = tiny_cnn()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clip_weights(model, 1e6)  # far bounds change nothing
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    clip_weights(model, 1.0)
    for name, weight in model.named_parameters():
        if weight.dim() >= 2:
            mean, std = before[name].mean(), before[name].std()
            assert weight.max() <= mean + std + 1e-6 and weight.min() >= mean - std - 1e-6
        else:  # biases are left alone
            assert torch.equal(weight, before[name])
    fresh = tiny_cnn()
    weight = fresh[0].weight
    with torch.no_grad():
        weight[0, 0, 0, 0] = 100.0
    assert replace_outliers(fresh, 3.0) >= 1
    assert fresh[0].weight[0, 0, 0, 0] < 1.0


def test_weight_attacks_report_every_attack_and_the_scratch_baseline(tmp_path):
    from nnobfuscator.security.weight_attacks import (
        WeightAttackRecipe,
        sample_share,
        sealed_weight_attacks,
    )
    from nnobfuscator.tasks import get_task
    from nnobfuscator.zoo.digits import digits_splits

    splits = digits_splits(image_size=8)
    assert len(sample_share(splits["train"], 0.1)) == 90
    with pytest.raises(ValueError, match="share"):
        sample_share(splits["train"], 0.0)
    bundle = seal(calibrated(), tmp_path / "b")
    shipped = load_file(str(bundle.directory / WEIGHTS_NAME))
    results = sealed_weight_attacks(
        tiny_cnn,
        shipped,
        splits["train"],
        splits["test"],
        get_task("classification"),
        shares=(0.05, 0.2),
        clip_sigmas=(3.0,),
        recipe=WeightAttackRecipe(steps=100, batch_size=32, finetune_lr=1e-2, scratch_lr=1e-2),
        progress=False,
    )
    rows = [(r.attack, r.setting, r.samples) for r in results]
    assert rows[:2] == [("none", "shipped weights", 0), ("clip", "t=3", 0)]
    assert ("fine-tune", "20%", 180) in rows and ("scratch", "5%", 45) in rows
    assert rows[-1][0] == "replace+fine-tune" and rows[-1][2] == 180
    test = splits["test"]
    served = calibrated()(test.inputs, tier="free").argmax(1)
    assert results[0].value == pytest.approx((served == test.labels).float().mean().item())
    tuned = next(r.value for r in results if r.attack == "fine-tune" and r.samples == 180)
    assert tuned > results[0].value + 0.2  # 100 steps on 180 labelled digits do teach it
    assert ("fine-tune (new head)", "5%", 45) in rows
