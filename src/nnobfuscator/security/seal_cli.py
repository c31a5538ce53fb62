"""``nnobf seal`` and ``nnobf unseal``: typer commands registered by ``nnobfuscator.cli``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from nnobfuscator.security.sealing import TIER_KEY_ENV

_out = Console(width=None if sys.stdout.isatty() else 160)
_err = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> None:
    _err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def seal_command(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (from demo/calibrate).")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write.")],
) -> None:
    """Seal an artifact for devices: plain weights at the lowest tier, higher tiers encrypted.

    Prints one key per higher tier, once (stdout): the key of a tier unlocks it and every tier
    below it. Keys are not stored anywhere; sealing again makes a bundle with new keys.
    """
    from nnobfuscator.core.serialization import read_config
    from nnobfuscator.jobs.sources import load_base_model
    from nnobfuscator.security.sealing import SealError, seal
    from nnobfuscator.tiered.model import TieredModel

    try:
        config = read_config(artifact)
        source = config.get("meta", {}).get("source", {})
        if "model" not in source:
            _fail(
                f"{artifact} does not record its base model; seal it in Python: "
                "nnobfuscator.security.sealing.seal(TieredModel.from_pretrained(dir, model), out)"
            )
        base, _ = load_base_model(source["model"], progress=False)
        tiered = TieredModel.from_pretrained(artifact, base)
        model_source = {k: v for k, v in source["model"].items() if k != "weights"}
        result = seal(
            tiered,
            out,
            extra={
                "source": {"model": model_source, "data": source.get("data", {})},
                "base_recipe": tiered.meta.get("base_model", {}).get("recipe"),
                **{k: tiered.meta[k] for k in ("classes", "preprocessing") if k in tiered.meta},
            },
        )
    except (SealError, ValueError) as err:
        _fail(str(err))
    table = Table(title=f"sealed {tiered.model_name} into {result.directory}")
    for column in ("tier", "target", "test", "unlocks"):
        table.add_column(column)
    names = tiered.tier_names
    for index, name in enumerate(names):
        test = tiered.get_tier(name).metrics.get("test")
        table.add_row(
            name,
            tiered.get_tier(name).target.spec,
            "-" if test is None else f"{100 * test:.1f}%",
            "no key (shipped weights)" if index == 0 else ", ".join(names[: index + 1]),
        )
    _err.print(table)
    _err.print(
        "tier keys follow, one per line (shown once, stored nowhere; give each user the key of "
        f"their tier; `nnobf unseal {result.directory} --key KEY` or ${TIER_KEY_ENV} restores it):"
    )
    for name, key in result.keys.items():
        print(f"{name}\t{key}", flush=True)


def unseal_command(
    bundle: Annotated[Path, typer.Argument(help="Sealed bundle directory (from nnobf seal).")],
    key: Annotated[
        str | None,
        typer.Option(
            envvar=TIER_KEY_ENV,
            help=f"Tier key (or ${TIER_KEY_ENV}); none: the lowest tier.",
            show_default=False,
        ),
    ] = None,
    tier: Annotated[
        str | None, typer.Option(help="A tier at or below the key's (default: the key's).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the tier's weights here (.safetensors).")
    ] = None,
    evaluate: Annotated[
        bool, typer.Option("--evaluate", help="Measure the tier on the bundle's test data.")
    ] = False,
) -> None:
    """Restore one tier of a sealed bundle: check the key, decrypt, and write or measure it."""
    from safetensors.torch import save_file

    from nnobfuscator.security.sealing import SealError, read_manifest, unseal_state_dict

    try:
        manifest = read_manifest(bundle)
        state, restored = unseal_state_dict(bundle, key, tier=tier)
    except SealError as err:
        _fail(str(err))
    record = next(t for t in manifest["tiers"] if t["name"] == restored)
    _err.print(f"unsealed tier [bold]{restored}[/] of {manifest['model']} (bundle {bundle})")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out))
        _err.print(f"wrote {out}: load it with model.load_state_dict(load_file(...))")
    if evaluate:
        value, metric = _measure(manifest, state, float(record.get("input_scale", 1.0)))
        expected = record.get("metrics", {}).get("test")
        served = "" if expected is None else f" (served tier measured {100 * expected:.1f}%)"
        _out.print(f"{restored}: test {metric} {100 * value:.1f}%{served}")


def _measure(
    manifest: dict[str, Any], state: dict[str, Any], input_scale: float = 1.0
) -> tuple[float, str]:
    """The bundle's test metric for ``state``, on the data source it records (inputs resized by
    the tier's ``input_scale``)."""
    from nnobfuscator.jobs.sources import SourceError, build_architecture, load_split
    from nnobfuscator.tasks import get_task

    source = manifest.get("source", {})
    if "model" not in source or not source.get("data"):
        _fail("the bundle does not record its architecture and data; measure it in Python")
    try:
        model = build_architecture(source["model"], state)
        model.load_state_dict(state)
        split = load_split(source["data"], "test")
    except (SourceError, RuntimeError) as err:
        _fail(f"cannot rebuild the bundle's model or data: {err}")
    task = get_task(manifest["task"])
    from nnobfuscator.strategies.input_resolution import resize_input

    inputs = resize_input(split.inputs, input_scale)
    return task.measure(model, inputs, split.labels), task.metric


def attack_bundle_command(
    bundle: Path,
    *,
    report: Path | None = None,
    plot: Path | None = None,
    train_steps: int | None = None,
    progress: bool = True,
) -> None:
    """``nnobf attack BUNDLE``: the attacks on sealed weights, as a table, JSON and plot."""
    import json

    from nnobfuscator.security.sealing import SealError
    from nnobfuscator.security.weight_attacks import attack_bundle

    try:
        manifest, results = attack_bundle(bundle, progress=progress, train_steps=train_steps)
    except (SealError, ValueError) as err:
        _fail(str(err))
    metrics = {t["name"]: t.get("metrics", {}).get("test") for t in manifest["tiers"]}
    scratch = {r.samples: r.value for r in results if r.attack == "scratch"}
    table = Table(
        title=f"attacks on the sealed {manifest['model']} (tiers: "
        + ", ".join(f"{n} {100 * v:.1f}%" for n, v in metrics.items() if v is not None)
        + ")"
    )
    for column in ("attack", "setting", "labelled samples", "after attack", "from scratch"):
        table.add_column(column, justify="left" if column in {"attack", "setting"} else "right")
    for result in results:
        if result.attack == "scratch":
            continue
        baseline = scratch.get(result.samples)
        table.add_row(
            result.attack,
            result.setting,
            str(result.samples),
            f"{100 * result.value:.1f}%",
            "-" if baseline is None or not result.samples else f"{100 * baseline:.1f}%",
        )
    _out.print(table)
    payload = {
        "bundle": str(bundle),
        "model": manifest["model"],
        "tiers": metrics,
        "results": [r.to_dict() for r in results],
    }
    report = report or bundle / "attack-report.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(payload, indent=2) + "\n")
    plot = _plot_sealed_attacks(payload, plot or bundle / "attacks.png")
    _err.print(f"report: {report}\nplot:   {plot}")


def _plot_sealed_attacks(payload: dict[str, Any], path: Path) -> Path:
    """Accuracy after fine-tuning vs training from scratch per data share, with the tiers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnobfuscator.tasks.figures import save_figure

    results = payload["results"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    labels = {
        "fine-tune": ("o-", "sealed weights + fine-tuning"),
        "fine-tune (new head)": ("^-", "sealed weights, new head + fine-tuning"),
        "scratch": ("s--", "from scratch"),
    }
    for attack, (style, label) in labels.items():
        rows = sorted((r["samples"], r["value"]) for r in results if r["attack"] == attack)
        if rows:
            ax.plot([s for s, _ in rows], [100 * v for _, v in rows], style, label=label)
    for name, value in payload["tiers"].items():
        if value is not None:
            ax.axhline(100 * value, color="grey", lw=0.8, ls=":")
            ax.annotate(name, (0.01, 100 * value), xycoords=("axes fraction", "data"), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training samples the attacker has")
    ax.set_ylabel("test metric (%)")
    ax.set_title(f"attacks on the sealed {payload['model']}")
    ax.legend(loc="best")
    fig.tight_layout()
    return save_figure(fig, path)
