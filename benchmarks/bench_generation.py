"""Tiered text generation on SmolLM2-135M-Instruct: calibrated compute tiers, their next-token
accuracy and FLOPs per token, and decoding speed per tier and in a batch mixing tiers.

Tiers ``free=60%,pro=85%,premium=full`` of next-token accuracy on 24 Python-documentation
passages of 256 tokens (calibration and test from disjoint documents), ``compute="auto"``
(decoder layers skipped, gated-MLP hidden units slimmed), no degrading strategy. Decoding:
greedy, 32 new tokens after a 16-token prompt, batch 1 and 8, tokens per second as ratios to the
plain model; a batch of 8 mixing the three tiers against the full tier's batch of 8. Voting:
next-word questions from the test passages (48 tokens of context, the word that follows), answered
by generation; one greedy answer against the majority of 5 and 10 sampled ones (temperature 0.7,
top-p 0.95, a seed per sample).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import KEY, QUICK, TIERS, Section, interleaved_ms, repeats, where

from nnobfuscator import calibrate, obfuscate
from nnobfuscator.extraction.self_consistency import vote_accuracy
from nnobfuscator.tasks.text_generation import next_word_questions
from nnobfuscator.zoo.language import load_smollm2, smollm2_available, smollm2_missing_message
from nnobfuscator.zoo.python_docs import python_docs_available, python_docs_splits

HEADING = "## Text generation on SmolLM2-135M-Instruct (`make bench`)"
PLOT = "generation_curve.png"
NEW_TOKENS = 32
PROMPT_TOKENS = 16


def _skipped(reason: str) -> Section:
    return Section("generation", f"{HEADING}\n\nNot run: {reason}.\n", [], {"skipped": reason})


def _kv_bytes_per_token(tiered: Any, prompt: torch.Tensor, tier: str) -> float:
    """Key-value cache bytes per token of one sequence at ``tier``."""
    out = tiered.generate(
        prompt[:1], tier=tier, max_new_tokens=4, do_sample=False, return_dict_in_generate=True
    )
    cache = out.past_key_values
    total = sum(
        layer.keys.numel() + layer.values.numel()
        for layer in cache.layers
        if layer.keys is not None
    )
    return 4.0 * total / out.sequences.shape[1]  # float32


def run() -> Section:
    if not smollm2_available():
        return _skipped(smollm2_missing_message())
    if not python_docs_available():
        return _skipped("the Python documentation sources are not installed (python3-doc)")
    model, tokenizer = load_smollm2()
    passages = 4 if QUICK else 24
    splits = python_docs_splits(
        tokenizer, window=64 if QUICK else 256, calibration=passages, test=passages
    )
    tiered = obfuscate(model, tiers=TIERS, compute="auto", task="text-generation", key=KEY)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = calibrate(
            tiered, splits["calibration"], splits["test"], progress=True, batch_size=4
        )
    calibrate_s = time.perf_counter() - started
    prompt = splits["test"].inputs["input_ids"][:8, :PROMPT_TOKENS]
    options = {
        "max_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "min_new_tokens": NEW_TOKENS,
        "pad_token_id": tokenizer.pad_token_id,
        "attention_mask": None,  # set per batch below: no padding, every token attended
    }
    mixed = ["free", "pro", "premium"] * 2 + ["free", "pro"]
    runs = {}
    for batch in (1, 8):
        ids = prompt[:batch]
        options = {**options, "attention_mask": torch.ones_like(ids)}
        runs[f"plain@{batch}"] = lambda ids=ids, options=options: model_generate(
            tiered, ids, options
        )
        for tier in tiered.tier_names:
            runs[f"{tier}@{batch}"] = lambda ids=ids, tier=tier, options=options: tiered.generate(
                ids, tier=tier, **options
            )
    runs["mixed@8"] = lambda: tiered.generate(prompt, tiers=mixed[: len(prompt)], **options)
    ms = interleaved_ms(runs, repeats(5, 1))
    kv = {tier: _kv_bytes_per_token(tiered, prompt, tier) for tier in tiered.tier_names}
    questions = next_word_questions(
        splits["test"].inputs["input_ids"], tokenizer, context=48 if not QUICK else 32
    )
    votes = {
        tier: vote_accuracy(
            tiered, tokenizer, questions, tier, votes=(5, 10), max_new_tokens=3, progress=True
        )
        for tier in ("free", "premium")
    }
    rows = {t["name"]: t for t in report["tiers"]}
    curve = report.get("settings", {}).get("compute_curve", [])
    _plot(curve, rows, (Path(tempfile.gettempdir()) if QUICK else Path(__file__).parent) / PLOT)
    lines = [
        HEADING,
        "",
        f"{where()}. {__doc__.split(chr(10) + chr(10))[1].strip()} Calibration took "
        f"{calibrate_s:.0f} s. The weights are SmolLM2's Q4_1 GGUF dequantized to float32.",
        "",
        "| tier | target | next-token accuracy (calibration / test) | perplexity (test) | FLOPs per token (vs full) | KV cache bytes per token | tokens/s vs plain, batch 1 | batch 8 | setting |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tier in tiered.tier_names:
        row = rows[tier]
        target = "full" if row["target"] is None else f"{100 * row['target']:.1f}%"
        setting = {k: v for k, v in (row.get("params") or {}).items()}
        lines.append(
            f"| {tier} | {target} | {100 * row['achieved']['calibration']:.1f}% / "
            f"{100 * row['achieved']['test']:.1f}% | {row['extra'].get('perplexity', float('nan')):.1f} | "
            f"{row['relative_cost']:.3f} | {kv[tier]:,.0f} | {ms['plain@1'] / ms[f'{tier}@1']:.2f}× | "
            f"{ms['plain@8'] / ms[f'{tier}@8']:.2f}× | `{_short(setting)}` |"
        )
    mixed_ratio = ms["mixed@8"] / ms["premium@8"]
    lines += [
        "",
        f"A batch of 8 mixing the three tiers in one `generate` call took {ms['mixed@8']:.0f} ms, "
        f"**{mixed_ratio:.2f}×** the full tier's batch of 8 ({ms['premium@8']:.0f} ms). The tiers "
        "share one decoding pass: a skipped layer runs on the rows whose tier keeps it, a "
        "slimmed MLP once at full width with each row's dropped units held at their mean (its "
        "weights read once per step).",
        "",
        f"Next-token accuracy against FLOPs per token for the {len(curve)} settings the compute "
        f"search costed, and the tiers: [`{PLOT}`]({PLOT}).",
        "",
        f"Voting over sampled answers ({len(questions)} next-word questions from the test "
        "passages, exact match of the first generated word):",
        "",
        "| tier | one greedy answer | one sampled answer | majority of 5 | majority of 10 | "
        "gain of 10 over greedy |",
        "|---|---|---|---|---|---|",
        *(
            f"| {tier} | {100 * v['greedy']:.1f}% | {100 * v['sampled']:.1f}% | "
            f"{100 * v['vote@5']:.1f}% | {100 * v['vote@10']:.1f}% | "
            f"{100 * (v['vote@10'] - v['greedy']):+.1f} points |"
            for tier, v in votes.items()
        ),
        "",
    ]
    summary = [
        (
            "SmolLM2 text generation: free / pro next-token accuracy (test) and FLOPs per token",
            f"{100 * rows['free']['achieved']['test']:.1f}% at {rows['free']['relative_cost']:.2f} / "
            f"{100 * rows['pro']['achieved']['test']:.1f}% at {rows['pro']['relative_cost']:.2f} "
            f"(full {100 * rows['premium']['achieved']['test']:.1f}%)",
        ),
        ("SmolLM2: batch of 8 mixing three tiers vs the full tier's batch", f"{mixed_ratio:.2f}×"),
        (
            "SmolLM2 free tier: majority of 10 sampled answers vs one greedy (next word)",
            f"{100 * (votes['free']['vote@10'] - votes['free']['greedy']):+.1f} points",
        ),
    ]
    data = {
        "report": report,
        "ms": ms,
        "kv_bytes_per_token": kv,
        "calibrate_s": calibrate_s,
        "votes": votes,
        "compute_curve": curve,
        "questions": len(questions),
    }
    return Section("generation", "\n".join(lines) + "\n", summary, data)


def _plot(curve: list[dict[str, float]], rows: dict[str, Any], path: Path) -> None:
    """Next-token accuracy against FLOPs per token: every setting the compute search costed
    (search half of the calibration passages) and the tiers as calibrated (test passages)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter(
        [p["cost"] for p in curve],
        [100 * p["utility"] for p in curve],
        s=14,
        color="#8da0cb",
        label="settings the compute search ran (calibration passages)",
    )
    for index, (name, row) in enumerate(rows.items()):
        ax.scatter(row["relative_cost"], 100 * row["achieved"]["test"], s=60, marker="D")
        ax.annotate(
            f"{name} (test)",
            (row["relative_cost"], 100 * row["achieved"]["test"]),
            textcoords="offset points",
            xytext=(6, -10 - 10 * index),
            fontsize=8,
        )
        if row["target"] is not None:
            ax.axhline(100 * row["target"], color="#cccccc", linestyle=":", linewidth=1)
    ax.set_xlabel("FLOPs per token, relative to the full model")
    ax.set_ylabel("next-token accuracy (%)")
    ax.set_title("SmolLM2-135M: layer skipping + gated-MLP slimming", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_generate(tiered: Any, ids: torch.Tensor, options: dict[str, Any]) -> Any:
    """The plain model's own generate (tiers off: the user's modules run untouched)."""
    with tiered.disable_tiers():
        return tiered.base_model.generate(ids, **options)


def _short(setting: dict[str, Any]) -> str:
    skip = setting.get("block-skip", {}).get("skip", [])
    keep = setting.get("channel-slim", {}).get("keep", {})
    layers = ",".join(name.rsplit(".", 1)[-1] for name in skip)
    parts = [
        f"skip {layers}" if layers else "",
        f"MLP keep {list(keep.values())[0]}" if keep else "",
    ]
    return "; ".join(p for p in parts if p) or "-"
