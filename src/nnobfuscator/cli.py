"""The ``nnobf`` command line."""

from __future__ import annotations

import json
import sys
from importlib import import_module
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from nnobfuscator.version import __version__

#: commands whose modules load torch at import time: name -> (module, function), imported only
#: when the command runs or help lists it, so that `nnobf keys ...` never pays for them
_LAZY_COMMANDS = {
    "attack": ("nnobfuscator.security.attack_cli", "attack"),
    "seal": ("nnobfuscator.security.seal_cli", "seal_command"),
    "unseal": ("nnobfuscator.security.seal_cli", "unseal_command"),
}


class _LazyGroup(TyperGroup):
    """The top-level group: the commands of :data:`_LAZY_COMMANDS` are built on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        return names + [name for name in _LAZY_COMMANDS if name not in names]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS and cmd_name not in self.commands:
            module, function = _LAZY_COMMANDS[cmd_name]
            single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
            single.command(cmd_name)(getattr(import_module(module), function))
            self.add_command(typer.main.get_command(single), cmd_name)
        return super().get_command(ctx, cmd_name)


app = typer.Typer(
    cls=_LazyGroup,
    help="nnobfuscator: one trained model, a calibrated ladder of quality tiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Wide enough for the tier table when output is piped or captured (rich assumes 80 columns).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, soft_wrap=True)

DEFAULT_TIERS = "free=60%,pro=85%,premium=full"
_PLAN_KEYS = {
    "task",
    "model",
    "data",
    "tiers",
    "strategy",
    "compute",
    "targets",
    "out",
    "report",
    "plot",
    "key",
    "against",
    "queries",
}


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code=2)


def _print_table(report: dict[str, Any]) -> None:
    from nnobfuscator.calibration.report import report_columns, report_rows

    splits, base = report["splits"], report["base"]
    table = Table(
        title=f"{report['model']} on {report['dataset']} - {report['metric']} per tier "
        f"(calibration n={splits['calibration']}, test n={splits['test']})"
    )
    for column in report_columns(report):
        table.add_column(
            column, justify="left" if column in {"tier", "strategy", "answer"} else "right"
        )
    for row in report_rows(report):
        table.add_row(*row)
    console.print(table)
    console.print(
        f"full model: calibration {100 * base['calibration']:.1f}%, test {100 * base['test']:.1f}%"
        + (f"; timings {report['timings']}" if "timings" in report else "")
    )


def _run_job(**job: Any) -> None:
    """Run a calibration job, turning bad input into a clear exit, then print what it wrote."""
    from nnobfuscator.jobs.run import run_job

    try:
        result = run_job(**job)
    except ValueError as err:
        _fail(str(err))
    _finish(result)


def _finish(result: Any) -> None:
    _print_table(result.report)
    console.print(f"artifact: {result.artifact}")
    console.print(f"report:   {result.report_path}")
    console.print(f"plot:     {result.plot_path}")
    if result.masks_path is not None:
        console.print(f"masks:    {result.masks_path}")
    if result.grid_path is not None:
        console.print(f"grid:     {result.grid_path}")
    if result.answers_path is not None:
        console.print(f"answers:  {result.answers_path}")


@app.command()
def demo(
    task: Annotated[
        str,
        typer.Option(help="Task: classification, segmentation, text-to-image or text-generation."),
    ] = "classification",
    model: Annotated[
        str | None,
        typer.Option(
            help="Demo model: resnet18, vgg16, mobilenet_v3_small or vit (classification), "
            "deeplabv3 or fcn (segmentation), sd-digits (text-to-image), smollm2 "
            "(text-generation). Default: resnet18 / deeplabv3 / sd-digits / smollm2."
        ),
    ] = None,
    tiers: Annotated[
        str, typer.Option(help="Tiers, lowest first: name=target,...")
    ] = DEFAULT_TIERS,
    strategy: Annotated[
        str,
        typer.Option(
            help="auto (class-merge for classifiers, feature-mix otherwise), class-merge, "
            "feature-mix, weight-noise, logit-noise, aim-noise (weak baseline), or a+b."
        ),
    ] = "auto",
    compute: Annotated[
        bool,
        typer.Option(
            help="Make lower tiers cheaper (block skip, channel slim, input resolution where "
            "the model allows; fewer steps and guidance cut-off for text-to-image); "
            "--no-compute: every tier costs the full model."
        ),
    ] = True,
    data: Annotated[
        str | None,
        typer.Option(
            help="Dataset of a classification demo: fashion-mnist (resnet18's default; Debian's "
            "dataset-fashion-mnist) or digits (scikit-learn's, every classifier)."
        ),
    ] = None,
    report: Annotated[Path | None, typer.Option(help="Report JSON path.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Plot PNG path.")] = None,
    out: Annotated[Path | None, typer.Option(help="Artifact directory.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Train (once, cached) a demo model, calibrate its tiers, print the table."""
    from nnobfuscator.zoo import list_models
    from nnobfuscator.zoo.classifiers import model_datasets, zoo_entry
    from nnobfuscator.zoo.fashion import fashion_mnist_available, missing_message

    defaults = {
        "classification": "resnet18",
        "segmentation": "deeplabv3",
        "text-to-image": "sd-digits",
        "text-generation": "smollm2",
    }
    if task not in defaults:
        _fail(f"task {task!r} has no demo; available: {', '.join(defaults)}")
    model = model or defaults[task]
    if model not in list_models(task):
        _fail(f"unknown {task} demo model {model!r}; choose one of {', '.join(list_models(task))}")
    task_source = None
    if task == "text-generation":
        from nnobfuscator.zoo.language import smollm2_available, smollm2_missing_message
        from nnobfuscator.zoo.python_docs import python_docs_available

        if not smollm2_available():
            _fail(smollm2_missing_message())
        if not python_docs_available():
            _fail("the Python documentation sources are not installed: apt-get install python3-doc")
        data_source: dict[str, Any] = {"zoo": "python-docs", "window": 256, "passages": 24}
    elif task == "text-to-image":
        data_source = {"zoo": "digit-prompts"}
        task_source = {"judge": {"zoo": "digits-judge"}}
    else:
        datasets = model_datasets(model)
        if data is not None and data not in datasets:
            _fail(f"demo model {model!r} trains on {', '.join(datasets)}, not {data!r}")
        dataset = data or datasets[0]
        if dataset == "fashion-mnist" and not fashion_mnist_available():
            if data is not None:
                _fail(missing_message())
            console.print(f"[yellow]note:[/] {missing_message()}; this demo runs on digits")
            dataset = "digits"
        entry = zoo_entry(model, dataset)
        data_source = {"zoo": entry.dataset, "image_size": entry.image_size}
    model_source: dict[str, Any] = {"zoo": model}
    if task in ("classification", "segmentation"):
        model_source["dataset"] = data_source["zoo"]
    out = out or Path("runs") / f"{model}-{data_source['zoo']}-{strategy.replace('+', '_')}"
    _run_job(
        task=task,
        model_source=model_source,
        data_source=data_source,
        task_source=task_source,
        tiers=tiers,
        strategy=strategy,
        compute="auto" if compute else None,
        out=out,
        report_path=report,
        plot_path=plot,
        progress=not quiet,
    )


@app.command("calibrate")
def calibrate_plan(
    plan: Annotated[Path, typer.Argument(help="YAML plan: model, data, tiers, strategy, out.")],
    against: Annotated[
        str | None,
        typer.Option(
            help="face (default) or extractable: also measure what a user of each tier extracts "
            "with a few labels (decoding, a knock-off trained with the model's recipe) and fail "
            "when it exceeds max(target, labels only) + 3 points (minutes: trains copies)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Calibrate your own model from a YAML plan (see README for the format)."""
    import yaml

    if not plan.is_file():
        _fail(f"plan {plan} does not exist")
    try:
        spec = yaml.safe_load(plan.read_text())
    except yaml.YAMLError as err:
        _fail(f"plan {plan} is not valid YAML: {err}")
    if not isinstance(spec, dict):
        _fail(f"plan {plan} must be a mapping with keys model, data, tiers, ...")
    unknown = sorted(set(spec) - _PLAN_KEYS)
    if unknown:
        _fail(f"plan {plan}: unknown keys {unknown}; allowed: {sorted(_PLAN_KEYS)}")
    for required in ("model", "data"):
        if not isinstance(spec.get(required), dict):
            _fail(f"plan {plan}: '{required}' must be a mapping (see README)")
    base_dir = plan.parent

    def resolve(value: Any) -> Any:
        return str(base_dir / value) if isinstance(value, str) and value else value

    model_source = dict(spec["model"])
    if "weights" in model_source:
        model_source["weights"] = resolve(model_source["weights"])
    data_source = dict(spec["data"])
    for split in ("calibration", "test", "train", "pool"):
        if split in data_source:
            data_source[split] = resolve(data_source[split])
    out = Path(resolve(spec.get("out") or f"runs/{plan.stem}"))
    _run_job(
        task=spec.get("task", "classification"),
        model_source=model_source,
        data_source=data_source,
        tiers=spec.get("tiers", DEFAULT_TIERS),
        strategy=_plan_strategy(spec.get("strategy", "auto"), plan),
        compute=_plan_compute(spec.get("compute"), plan),
        targets=spec.get("targets"),
        out=out,
        report_path=Path(resolve(spec["report"])) if spec.get("report") else None,
        plot_path=Path(resolve(spec["plot"])) if spec.get("plot") else None,
        key=spec.get("key"),
        against=against or spec.get("against", "face"),
        queries=_plan_queries(spec.get("queries", [300, 1000]), plan),
        progress=not quiet,
    )


def _plan_queries(value: Any, plan: Path) -> list[int]:
    """A plan's ``queries``: label budgets of the extractable check (a list of integers)."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and v >= 10 for v in values):
        _fail(f"plan {plan}: 'queries' must be integers of at least 10, e.g. [300, 1000]")
    return values


def _plan_strategy(value: Any, plan: Path) -> Any:
    """A plan's ``strategy``: names joined with ``+``, a mapping of one strategy's options
    (``{name: feature-mix, block: 64}``) or a list of names and mappings."""
    from nnobfuscator.strategies import strategy_config

    if isinstance(value, str):
        return value
    strategies = []
    for item in value if isinstance(value, list) else [value]:
        try:
            if not isinstance(item, str | dict):
                raise ValueError("neither a name nor a mapping")
            strategies.append(item if isinstance(item, str) else strategy_config(item))
        except (TypeError, ValueError) as err:
            _fail(
                f"plan {plan}: strategy {item!r}: {err}. Give a name ('class-merge'), a mapping "
                "of one strategy's options ({name: feature-mix, block: 64}) or a list of them"
            )
    return strategies


def _plan_compute(value: Any, plan: Path) -> str | None:
    """A plan's ``compute``: true/"auto", false/absent, or strategy names joined with ``+``."""
    if value is None or value is False:
        return None
    if value is True:
        return "auto"
    if isinstance(value, list):
        value = "+".join(map(str, value))
    if not isinstance(value, str):
        _fail(f"plan {plan}: 'compute' must be true, false, 'auto' or 'block-skip+...'")
    return value


@app.command("eval")
def eval_artifact(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory.")],
    report: Annotated[Path | None, typer.Option(help="Report JSON path.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Plot PNG path.")] = None,
) -> None:
    """Re-measure every tier of an artifact on its test split."""
    from nnobfuscator.jobs.run import evaluate_artifact

    try:
        result = evaluate_artifact(
            artifact,
            report_path=report or artifact / "eval-report.json",
            plot_path=plot or artifact / "eval-tiers.png",
        )
    except ValueError as err:
        _fail(str(err))
    _finish(result)


@app.command()
def info(artifact: Annotated[Path, typer.Argument(help="Artifact directory.")]) -> None:
    """Print an artifact's tiers, strategy, targeted layers and metrics (no model needed)."""
    from nnobfuscator.core.serialization import read_config

    try:
        config = read_config(artifact)
    except ValueError as err:
        _fail(str(err))
    console.print(
        f"[bold]{config['model']}[/] ({config['task']}), nnobfuscator {config['version']}, "
        f"key id {config['key_id']}"
    )
    console.print(f"secret key: {_key_location(artifact, config['key_id'])}")
    base = config.get("meta", {}).get("base_model")
    if base:
        metric = next((k for k in base if k.startswith("test_")), None)
        measured = f", test {metric[5:]} {100 * base[metric]:.1f}%" if metric else ""
        console.print(
            f"base model: {base['model']} trained on {base['dataset']}{measured}, "
            f"{base.get('train_seconds', '?')} s; recipe {json.dumps(base['recipe'], sort_keys=True)}"
        )
    for strategy in config["strategies"]:
        layers = strategy["targets"] or []
        where = {"<input>": "the model input", "<call>": "the pipeline call"}.get(
            "".join(layers), f"{len(layers)} modules: {layers}"
        )
        console.print(f"strategy [bold]{strategy['name']}[/] on {where}")
    table = Table()
    for column in ("tier", "target", "params", "calibration", "test", "relative cost"):
        table.add_column(column)
    for tier in config["tiers"]:
        metrics = tier.get("metrics", {})
        table.add_row(
            tier["name"],
            tier["target"],
            json.dumps(tier.get("params", {})) or "-",
            *(f"{100 * metrics[k]:.1f}%" if k in metrics else "-" for k in ("calibration", "test")),
            f"{tier.get('relative_cost', 1.0):.3f}",
        )
    console.print(table)


def _key_location(artifact: Path, key_id: str) -> str:
    """Where the artifact's secret key can be found on this machine (never the key itself)."""
    import os

    from nnobfuscator.core.secret_key import ENCRYPTED_KEY_NAME, KEY_ENV, key_ring

    places = []
    if (key_ring() / f"{key_id}.key").is_file():
        places.append(f"this machine's key ring ({key_ring()})")
    if (artifact / ENCRYPTED_KEY_NAME).is_file():
        places.append(f"{ENCRYPTED_KEY_NAME} (needs the passphrase)")
    if os.environ.get(KEY_ENV):
        places.append(f"${KEY_ENV}")
    return ", ".join(places) or f"not on this machine: set ${KEY_ENV} or copy {key_id}.key"


@app.command()
def strategies() -> None:
    """List the registered strategies."""
    from nnobfuscator.strategies import get_strategy, list_strategies

    for name in list_strategies():
        console.print(f"[bold]{name}[/]: {get_strategy(name).description}")


@app.callback(invoke_without_command=True)
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        console.print(__version__)
        raise typer.Exit()


# HTTP service commands (nnobfuscator.serving): `nnobf keys ...` and `nnobf serve`. The module
# only imports typer, rich and sqlite at load time, so `nnobf keys ...` answers quickly.
from nnobfuscator.serving.cli import keys_app, serve  # noqa: E402

app.add_typer(keys_app, name="keys")
app.command("serve")(serve)


if __name__ == "__main__":
    app()
