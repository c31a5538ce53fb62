"""The end-to-end job behind ``nnobf demo`` and ``nnobf calibrate``: wrap, calibrate, save, report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nnobfuscator.calibration.calibrator import calibrate, evaluate
from nnobfuscator.calibration.report import plot_report, write_report
from nnobfuscator.core.data import Split
from nnobfuscator.core.serialization import read_config
from nnobfuscator.core.tiers import parse_tiers
from nnobfuscator.jobs.sources import (
    class_names,
    load_base_model,
    load_split,
    load_task,
    preprocessing,
)
from nnobfuscator.strategies import StrategyConfig, get_strategy
from nnobfuscator.tasks import Task
from nnobfuscator.tasks.grid import plot_generation_grid
from nnobfuscator.tasks.masks import plot_masks
from nnobfuscator.tiered.model import InputSpec, TieredModel
from nnobfuscator.tiered.obfuscate import obfuscate


@dataclass
class JobResult:
    """What a calibration job produced."""

    model: TieredModel
    report: dict[str, Any]
    artifact: Path
    report_path: Path
    plot_path: Path
    masks_path: Path | None = None
    grid_path: Path | None = None
    answers_path: Path | None = None


def run_job(
    *,
    task: str,
    model_source: dict[str, Any],
    data_source: dict[str, Any],
    tiers: str | list[Any],
    strategy: str | StrategyConfig | list[str | StrategyConfig],
    out: Path,
    compute: str | None = None,
    targets: list[str] | None = None,
    report_path: Path | None = None,
    plot_path: Path | None = None,
    key: str | None = None,
    progress: bool = True,
    task_source: dict[str, Any] | None = None,
    against: str = "face",
    queries: list[int] | None = None,
) -> JobResult:
    """Load the base model and data, calibrate the tiers, then write artifact, report and plot.

    Args:
        task_source: what the task needs beyond its name (text-to-image: its judge).
        against: ``"extractable"`` also checks what each tier's user extracts with ``queries``
            labels (the attacker's pool: the data source's ``pool`` split, else its ``train``
            split; knock-offs are the model's architecture trained with its recipe).
    """
    parse_tiers(tiers)  # fail on a bad tier spec before any model is trained or loaded
    if isinstance(strategy, str):
        for name in strategy.split("+"):
            if name.strip() != "auto":
                get_strategy(name.strip())
    scorer = load_task(task, task_source, progress=progress)
    base, info = load_base_model(model_source, progress=progress)
    calibration = load_split(data_source, "calibration")
    test = load_split(data_source, "test")
    dataset = data_source.get("zoo") or Path(str(data_source.get("calibration", "custom"))).name
    input_spec = _image_spec(calibration.inputs)
    tiered = obfuscate(
        base,
        tiers=tiers,
        strategy=strategy,
        compute=compute,
        targets=targets,
        key=key,
        task=task,
        model_name=info.get("model", model_source.get("arch", "model")),
        input_spec=input_spec,
        call_options=model_source.get("call") or info.get("call"),
        meta={
            "source": {
                "model": model_source,
                "data": data_source,
                **({"task": task_source} if task_source else {}),
            },
            "dataset": dataset,
            **({"base_model": info} if "recipe" in info else {}),
            **({"classes": classes} if (classes := class_names(data_source)) else {}),
            **(
                {"preprocessing": preprocessing(data_source, **_spec_shape(input_spec), task=task)}
                if input_spec is not None
                else {}
            ),
        },
    )
    extractable: dict[str, Any] = {}
    if against == "extractable":
        extractable = _extractable_options(model_source, data_source, info, queries)
    report = calibrate(
        tiered,
        calibration,
        test,
        dataset=dataset,
        progress=progress,
        task=scorer,
        against=against,
        **({"batch_size": 4} if task == "text-generation" else {}),  # logits span a vocabulary
        **extractable,
    )
    from nnobfuscator.zoo import LANGUAGE_MODELS

    tokenizer = None
    if model_source.get("zoo") in LANGUAGE_MODELS:
        from nnobfuscator.zoo.language import load_smollm2_tokenizer

        tokenizer = load_smollm2_tokenizer()
    return _write_outputs(
        tiered, report, out, report_path, plot_path, test, save=True, tokenizer=tokenizer
    )


def _extractable_options(
    model_source: dict[str, Any],
    data_source: dict[str, Any],
    info: dict[str, Any],
    queries: list[int] | None,
) -> dict[str, Any]:
    """``calibrate``'s options for ``against="extractable"``: the attacker's pool, an untrained
    copy of the architecture and the recipe the owner trained with."""
    from functools import partial

    from nnobfuscator.extraction.extract import CopyRecipe
    from nnobfuscator.jobs.sources import SourceError, build_architecture

    pool = None
    for name in ("pool", "train"):
        try:
            pool = load_split(data_source, name)
            break
        except (SourceError, KeyError):
            continue
    if pool is None:
        raise SourceError(
            "against: extractable needs the attacker's images: give data.pool (or data.train), "
            "a folder of labelled images the model did not train on"
        )
    options: dict[str, Any] = {"pool": pool, "recipe": CopyRecipe.from_training(info.get("recipe"))}
    if queries:
        options["queries"] = queries
    if "diffusers" not in model_source:
        options["build_copy"] = partial(build_architecture, model_source, {})
    return options


def _spec_shape(spec: InputSpec) -> dict[str, Any]:
    """``channels`` and ``size`` of an image model's input check."""
    size = (spec.height, spec.width) if spec.height and spec.width else None
    return {"channels": spec.channels, "size": size}


def _image_spec(inputs: Any) -> InputSpec | None:
    """The input check of an image model (none for prompts or token ids)."""
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
        return InputSpec(*inputs.shape[1:])
    return None


@dataclass
class OpenedArtifact:
    """An artifact rebuilt from its stored sources: the tiered model, where its model and data
    come from, and the task that scores it."""

    model: TieredModel
    source: dict[str, Any]
    task: Task

    def split(self, name: str) -> Split:
        """One split (``train``, ``calibration``, ``test``) of the artifact's data source."""
        return load_split(self.source["data"], name)


def open_artifact(artifact: Path, *, progress: bool = True) -> OpenedArtifact:
    """Rebuild an artifact's base model from its stored source and load its tiers onto it.

    Raises:
        ValueError: the artifact is missing or corrupt, or does not record its sources.
    """
    config = read_config(artifact)
    source = config.get("meta", {}).get("source")
    if not source:
        raise ValueError(
            f"{artifact} does not record where its model and data come from; "
            "load it in Python with TieredModel.from_pretrained and call nnobfuscator.evaluate"
        )
    base, _ = load_base_model(source["model"], progress=progress)
    tiered = TieredModel.from_pretrained(str(artifact), base)
    scorer = load_task(tiered.task, source.get("task"), progress=progress)
    return OpenedArtifact(tiered, source, scorer)


def evaluate_artifact(
    artifact: Path,
    *,
    report_path: Path | None = None,
    plot_path: Path | None = None,
    progress: bool = True,
) -> JobResult:
    """Rebuild an artifact's base model and data from its stored sources and re-measure it."""
    opened = open_artifact(artifact, progress=progress)
    tiered, test = opened.model, opened.split("test")
    report = evaluate(tiered, test, dataset=tiered.meta.get("dataset", "custom"), task=opened.task)
    return _write_outputs(tiered, report, artifact, report_path, plot_path, test, save=False)


def _write_outputs(
    tiered: TieredModel,
    report: dict[str, Any],
    out: Path,
    report_path: Path | None,
    plot_path: Path | None,
    test: Split,
    *,
    save: bool,
    tokenizer: Any = None,
) -> JobResult:
    out = Path(out)
    if save:
        tiered.save_pretrained(str(out))
        if tiered.task == "text-generation" and tokenizer is not None:
            tokenizer.save_pretrained(str(out / "tokenizer"))  # what the server reads
    report["artifact"] = str(out)
    report_path = write_report(report, report_path or out / "report.json")
    plot_path = plot_report(report, plot_path or out / "tiers.png")
    masks_path = grid_path = answers_path = None
    if tiered.task == "segmentation":
        masks_path = plot_masks(tiered, test, Path(plot_path).with_name("masks.png"))
    if tiered.task == "text-to-image":
        grid_path = plot_generation_grid(tiered, test, Path(plot_path).with_name("grid.png"))
    if tiered.task == "text-generation" and tokenizer is not None:
        from nnobfuscator.tasks.answers import tier_answers, write_answers
        from nnobfuscator.zoo.language import DEMO_PROMPTS

        answers = tier_answers(tiered, tokenizer, DEMO_PROMPTS)
        answers_path = write_answers(answers, DEMO_PROMPTS, Path(plot_path).with_name("answers.md"))
    return JobResult(
        tiered, report, out, report_path, plot_path, masks_path, grid_path, answers_path
    )
