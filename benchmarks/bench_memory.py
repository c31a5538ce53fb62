"""Memory: the bytes a tiered model holds after every tier ran once, vs one plain model and vs
one separate copy per tier."""

from __future__ import annotations

from typing import Any

import torch
from _common import (
    TIERS,
    TIERS_10,
    Section,
    Tiered,
    batch_of,
    run_every_tier,
    tiered_zoo_model,
    where,
)
from torch import nn

HEADING = "## Memory: one tiered model vs one plain model vs a copy per tier (`make bench`)"
#: attribute names whose tensors are per-tier derived caches (folded or slimmed weights)
_CACHE_NAMES = ("_weights", "_cache", "cache")


def plain_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (each storage once)."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict().values():
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _walk(root: Any, original: set[int]) -> dict[str, int]:
    """Every storage reachable from ``root`` once, as model / keyed / caches bytes."""
    sizes = {"model": 0, "keyed": 0, "caches": 0}
    storages: set[int] = set()
    visited: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        obj, in_cache = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            pointer = storage.data_ptr()
            if pointer in storages or storage.nbytes() == 0:
                continue
            storages.add(pointer)
            kind = "model" if pointer in original else ("caches" if in_cache else "keyed")
            sizes[kind] += storage.nbytes()
            continue
        if id(obj) in visited or isinstance(obj, str | bytes | int | float | bool | type(None)):
            continue
        visited.add(id(obj))
        if isinstance(obj, dict):
            for key, value in obj.items():
                cache = in_cache or (isinstance(key, str) and key in _CACHE_NAMES)
                stack.append((value, cache))
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend((value, in_cache) for value in obj)
        elif not isinstance(obj, type):
            try:
                attributes = vars(obj)
            except TypeError:  # no __dict__ (slots, builtins)
                continue
            for key, value in attributes.items():
                stack.append((value, in_cache or key in _CACHE_NAMES))
    sizes["total"] = sum(sizes.values())
    return sizes


def memory_breakdown(item: Tiered) -> tuple[dict[str, int], str]:
    """``TieredModel.memory_bytes()`` when the core has it, else a walk of every tensor reachable
    from the tiered model (each storage once; views of the user's weights cost nothing)."""
    if hasattr(item.model, "memory_bytes"):
        return dict(item.model.memory_bytes()), "memory_bytes()"
    return _walk(item.model, item.original), "tensor walk"


def measure(item: Tiered) -> dict[str, Any]:
    """Run every tier once, then account the bytes."""
    run_every_tier(item.model, batch_of(item.test, 8))
    sizes, method = memory_breakdown(item)
    walked = _walk(item.model, item.original)
    plain = plain_bytes(item.plain)
    tiers = len(item.model.tier_names)
    return {
        "plain": plain,
        "tiers": tiers,
        **sizes,
        "method": method,
        "ratio": sizes["total"] / plain,
        "walk_ratio": walked["total"] / plain,
        "copies_ratio": float(tiers),
    }


def run() -> Section:
    """Rows: resnet18 feature-mix with compute auto (3 and 10 tiers), without compute, vgg16."""
    configs = [
        ("resnet18", "feature-mix", "auto", TIERS),
        ("resnet18", "feature-mix", "auto", TIERS_10),
        ("resnet18", "feature-mix", None, TIERS),
        ("resnet18", "feature-mix", None, TIERS_10),
        ("vgg16", "feature-mix", "auto", TIERS),
    ]
    rows = []
    for name, strategy, compute, tiers in configs:
        item = tiered_zoo_model(name, strategy=strategy, compute=compute, tiers=tiers)
        result = measure(item)
        result.update(name=name, strategy=strategy, compute=compute or "none")
        rows.append(result)
        print("memory", name, strategy, compute, result["tiers"], f"{result['ratio']:.3f}")
    mb = 1 / 2**20
    lines = [
        HEADING,
        "",
        f"{where()}. Bytes of every tensor the tiered model holds after each tier (and one mixed "
        "batch) ran once: the user's parameters and buffers (*model*), the strategies' keyed "
        "state (*keyed*), per-tier derived tensors such as folded or slimmed weights (*caches*). "
        "*N copies* is one plain model per tier. *Walk* cross-checks the total by visiting every "
        "tensor reachable from the tiered model (each storage once: views of shared weights cost "
        "nothing). Tiers `"
        f"{TIERS}`, and 10 tiers `{TIERS_10}`, calibrated on the demo models.",
        "",
        "| model | strategy | compute | tiers | plain (MiB) | model | keyed | caches | "
        "**tiered / plain** | walk / plain | N copies / plain | measured by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['strategy']} | {r['compute']} | {r['tiers']} | "
            f"{r['plain'] * mb:.1f} | {r['model'] * mb:.1f} | {r['keyed'] * mb:.2f} | "
            f"{r['caches'] * mb:.2f} | **{r['ratio']:.3f}** | {r['walk_ratio']:.3f} | "
            f"{r['copies_ratio']:.0f} | "
            f"{r['method']} |"
        )
    summary = [
        (
            f"Memory, {r['name']} {r['tiers']} tiers"
            + (", compute saving" if r["compute"] != "none" else ""),
            f"{r['ratio']:.2f}× one model (separate copies: {r['copies_ratio']:.0f}×)",
        )
        for r in rows
        if r["name"] == "resnet18" and r["compute"] != "none"
    ]
    return Section("memory", "\n".join(lines) + "\n", summary, {"rows": rows})
