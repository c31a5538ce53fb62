"""``nnobf attack``: run the attack suite against an artifact's served tiers (registered by
``nnobfuscator.cli``)."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from torch import nn

    from nnobfuscator.core.data import Split
    from nnobfuscator.extraction.distill import TrainRecipe

_out = Console(width=None if sys.stdout.isatty() else 160)
_err = Console(stderr=True, soft_wrap=True)

#: zoo datasets whose meaning a mirror image changes
NO_FLIP_DATASETS = ("digits", "digit-scenes")


def _fail(message: str) -> None:
    _err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def attack(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (from demo/calibrate).")],
    attacks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated attacks: repeat, jitter, augment, decode, distill, extract. "
            "Default: every attack that covers the task."
        ),
    ] = None,
    budget: Annotated[int, typer.Option(help="Queries per input for repeat/jitter/augment.")] = 21,
    queries: Annotated[
        str,
        typer.Option(
            help="Query budgets (labels) of distill, decode and extract, comma-separated."
        ),
    ] = "300,1000",
    tier: Annotated[
        str | None,
        typer.Option(help="The attacked tier, or 'all' (every tier below full). Default: lowest."),
    ] = None,
    answer_format: Annotated[
        str | None,
        typer.Option(
            help="What the attacker sees: scores, top_k:N, top1 or label. Default: each tier's "
            "own format (what the server gives its keys)."
        ),
    ] = None,
    flips: Annotated[
        bool | None,
        typer.Option(
            "--flips/--no-flips",
            help="Mirror copies in augment. Default: off for the zoo's digits, on otherwise.",
        ),
    ] = None,
    train_steps: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps of each distilled copy. Default: as many as the base model's "
            "recorded training took, else 240."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random draw of the attacks.")] = 0,
    report: Annotated[
        Path | None, typer.Option(help="Report JSON path (default: ARTIFACT/attack-report.json).")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Plot PNG path (default: ARTIFACT/attacks.png).")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Attack an artifact's served tiers as a user of one tier would, and report what each
    attack recovers (repeat and vote, changed copies and vote, decoding, distillation); on a
    sealed bundle, attack the shipped weights (fine-tuning, clipping, outlier replacement)."""
    from nnobfuscator.extraction.oracle import ATTACKED_TASKS, check_budget

    if (artifact / "bundle.json").is_file():  # a sealed bundle: attacks on the shipped weights
        from nnobfuscator.security.seal_cli import attack_bundle_command

        attack_bundle_command(
            artifact, report=report, plot=plot, train_steps=train_steps, progress=not quiet
        )
        return
    if not (artifact / "config.json").is_file():
        _fail(f"{artifact} is not an artifact directory (no config.json); run `nnobf demo` first")
    config = _read_config(artifact)
    task = config.get("task")
    if task not in ATTACKED_TASKS:
        _fail(f"attacks cover classification and segmentation; {artifact} is a {task} model")
    names = _attack_names(attacks, task)
    budgets = _query_budgets(queries) if {"decode", "distill", "extract"} & set(names) else []
    if answer_format is not None:
        from nnobfuscator.core.answers import AnswerFormat

        try:
            AnswerFormat.parse(answer_format)
        except ValueError as err:
            _fail(str(err))
    try:
        check_budget(budget)
    except ValueError as err:
        _fail(str(err))
    if train_steps is not None and train_steps < 1:
        _fail(f"--train-steps must be at least 1, got {train_steps}")
    start = time.perf_counter()
    try:
        report_data = _run(
            artifact,
            names,
            budget,
            budgets,
            tier,
            answer_format,
            flips,
            seed,
            train_steps=train_steps,
            progress=not quiet,
        )
    except ValueError as err:
        _fail(str(err))
    report_data["seconds"] = round(time.perf_counter() - start, 1)
    _write(artifact, report_data, report, plot)


def _read_config(artifact: Path) -> dict[str, Any]:
    from nnobfuscator.core.serialization import read_config

    try:
        return read_config(artifact)
    except ValueError as err:
        _fail(str(err))
    raise AssertionError  # unreachable: _fail exits


def _attack_names(value: str | None, task: str) -> list[str]:
    from nnobfuscator.security.attacks import ATTACKS, CLASSIFICATION_ONLY, default_attacks

    if value is None:
        return default_attacks(task)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown or not names:
        _fail(f"unknown attacks {unknown or '(none given)'}; choose from {', '.join(ATTACKS)}")
    uncovered = [name for name in names if name in CLASSIFICATION_ONLY and task != "classification"]
    if uncovered:
        verb = "covers" if len(uncovered) == 1 else "cover"
        _fail(f"{', '.join(uncovered)} {verb} classification only; this model's task is {task}")
    return list(dict.fromkeys(names))


def _query_budgets(value: str) -> list[int]:
    from nnobfuscator.extraction.distill import MIN_QUERIES

    try:
        budgets = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        budgets = []
    if not budgets or any(b < MIN_QUERIES for b in budgets):
        _fail(f"--queries must be integers of at least {MIN_QUERIES}, e.g. 300,1000; got {value!r}")
    return budgets


def _run(
    artifact: Path,
    names: list[str],
    budget: int,
    budgets: list[int],
    tier: str | None,
    answer_format: str | None,
    flips: bool | None,
    seed: int,
    *,
    train_steps: int | None,
    progress: bool,
) -> dict[str, Any]:
    from nnobfuscator.extraction.augment import AugmentConfig
    from nnobfuscator.jobs.run import open_artifact
    from nnobfuscator.security.attack_report import build_attack_report
    from nnobfuscator.security.attacks import run_attacks

    opened = open_artifact(artifact, progress=progress)
    model, data = opened.model, opened.source.get("data", {})
    tiers = _tiers(model, tier)
    if flips is None:
        flips = data.get("zoo") not in NO_FLIP_DATASETS
    augment = AugmentConfig(flips=flips)
    test = opened.split("test")
    pool = build_copy = recipe = copy_recipe = None
    if {"decode", "distill", "extract"} & set(names):
        pool, train_size = _query_pool(opened)
        if {"distill", "extract"} & set(names):
            build_copy, recipe = _copy_builder(model, opened.source["model"], train_size)
            if train_steps is not None:
                recipe = replace(recipe, steps=train_steps)
            from nnobfuscator.extraction.extract import CopyRecipe

            copy_recipe = CopyRecipe.from_training(model.meta.get("base_model", {}).get("recipe"))
    if weak := sorted(n for n, s in model.strategies.items() if s.weak):
        _err.print(f"note: {', '.join(weak)} is marked weak (nnobf serve refuses it by default)")
    results = run_attacks(
        model,
        test,
        attacks=names,
        tiers=tiers,
        budget=budget,
        queries=budgets,
        pool=pool,
        build_copy=build_copy,
        recipe=recipe,
        copy_recipe=copy_recipe,
        augment=augment,
        answer_format=answer_format,
        seed=seed,
        progress=progress,
    )
    settings = {
        "attacks": names,
        "budget": budget,
        "queries": budgets,
        "tiers": tiers,
        "answer_format": answer_format or "each tier's own",
        "seed": seed,
        "augment": asdict(augment),
        **({"recipe": asdict(recipe)} if recipe is not None else {}),
        **({"copy_recipe": asdict(copy_recipe)} if copy_recipe is not None else {}),
    }
    splits = {"test": len(test), **({"query_pool": len(pool)} if pool is not None else {})}
    report = build_attack_report(
        model, results, metric=opened.task.metric, settings=settings, splits=splits
    )
    report["artifact"] = str(artifact)
    return report


def _tiers(model: Any, tier: str | None) -> list[str]:
    lowered = [name for name in model.tier_names if not model.tiers[name].is_full]
    if tier is None:
        return [model.tier_names[0]]
    if tier == "all":
        if not lowered:
            raise ValueError("this model has no tier below full to attack")
        return lowered
    model.get_tier(tier)  # raises ValueError naming the tiers
    return [tier]


def _query_pool(opened: Any) -> tuple[Split, int]:
    """The attacker's query images (never the test split): the data source's ``pool`` split
    where it has one (images the model never trained on), else train and calibration data; and
    how many training images the base model learned from (for the copy's training length)."""
    import torch

    from nnobfuscator.core.data import Split
    from nnobfuscator.jobs.sources import SourceError

    with contextlib.suppress(SourceError, KeyError):
        pool = opened.split("pool")
        with contextlib.suppress(SourceError, KeyError):
            return pool, len(opened.split("train"))
        return pool, len(pool)
    parts = []
    with contextlib.suppress(SourceError):  # a folder source may have no train folder
        parts.append(opened.split("train"))
    parts.append(opened.split("calibration"))
    pool = Split(
        "pool",
        torch.cat([part.inputs for part in parts]),
        torch.cat([part.labels for part in parts]),
    )
    return pool, len(parts[0])


def _copy_builder(
    model: Any, source: dict[str, Any], train_size: int
) -> tuple[Callable[[], nn.Module], TrainRecipe]:
    """An untrained copy of the artifact's architecture, and how it trains: the base model's own
    recipe when the artifact records one (as many optimizer steps as its training took), else
    the default :class:`TrainRecipe`."""
    from nnobfuscator.extraction.distill import TrainRecipe
    from nnobfuscator.jobs.sources import build_architecture

    recipe = TrainRecipe()
    trained = model.meta.get("base_model", {}).get("recipe")
    if trained:
        batch = int(trained.get("batch_size", recipe.batch_size))
        recipe = TrainRecipe(
            lr=float(trained.get("lr", recipe.lr)),
            optimizer=str(trained.get("optimizer", recipe.optimizer)),
            batch_size=batch,
            steps=int(trained.get("epochs", 1)) * math.ceil(train_size / batch),
        )
    return partial(build_architecture, source, {}), recipe


def _write(
    artifact: Path, report_data: dict[str, Any], report: Path | None, plot: Path | None
) -> None:
    from nnobfuscator.calibration.report import write_report
    from nnobfuscator.security.attack_report import (
        ATTACK_COLUMNS,
        EXTRACT_COLUMNS,
        attack_rows,
        extract_rows,
        plot_attacks,
    )

    table = Table(
        title=f"{report_data['model']} on {report_data['dataset']}: attacks on served tiers "
        f"({report_data['metric']}, test n={report_data['splits']['test']})"
    )
    for column in ATTACK_COLUMNS:
        table.add_column(column, justify="left" if column in {"attack", "tier"} else "right")
    for row in attack_rows(report_data):
        table.add_row(*row)
    _out.print(table)
    extracted = extract_rows(report_data)
    if extracted:
        table = Table(
            title="extractable utility: what a user of each tier gets with N labels "
            "(best of face value, decoding and a knock-off) against the labels alone"
        )
        for column in EXTRACT_COLUMNS:
            table.add_column(column, justify="left" if column in {"tier", "format"} else "right")
        for row in extracted:
            table.add_row(*row)
        _out.print(table)
    report_path = write_report(report_data, report or artifact / "attack-report.json")
    plot_path = plot_attacks(report_data, plot or artifact / "attacks.png")
    _out.print(f"report: {report_path}")
    _out.print(f"plot:   {plot_path}")
