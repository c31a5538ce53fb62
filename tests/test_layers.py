"""The package is built in layers (docs/layout.md): each imports only the layers below it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "nnobfuscator"
#: bottom to top; packages on one line share a layer and never import each other
LAYERS = [
    {"version"},
    {"core"},
    {"strategies"},
    {"tiered"},
    {"tasks"},
    {"zoo", "extraction"},
    {"calibration"},
    {"jobs"},
    {"security", "serving"},
    {"cli", "__init__", "_compat"},
]


def _layer(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level part)`` of each ``nnobfuscator.*`` import of ``path``, lazy ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "nnobfuscator" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def test_every_package_of_the_source_is_in_a_layer():
    parts = {
        p.name.removesuffix(".py")
        for p in PACKAGE.iterdir()
        if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert parts == set().union(*LAYERS)


def test_no_import_reaches_up_or_sideways():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        own = relative.parts[0].removesuffix(".py")
        for line, part in _imports(path):
            if part != own and _layer(part) >= _layer(own):
                wrong.append(f"{relative}:{line} imports nnobfuscator.{part}")
    assert not wrong, "imports against the layers of docs/layout.md:\n" + "\n".join(wrong)


def test_the_layout_page_lists_the_layers_in_this_order():
    text = (ROOT / "docs" / "layout.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `([a-z_]+)(?:/|\.py)`", text, re.MULTILINE)
    assert rows, "docs/layout.md has no layer table"
    for number, part in rows:
        assert _layer(part) == int(number), f"docs/layout.md puts {part} in layer {number}"


def _module_of(path: Path) -> str:
    parts = ("nnobfuscator", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, lazy imports included (``from package import
    name`` counts as the module ``package.name`` where there is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found.update(n if n in modules else node.module for n in names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in modules}


def test_no_two_modules_import_each_other_even_through_others():
    paths = {_module_of(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {name: _module_imports(path, modules) - {name} for name, path in paths.items()}
    # a package's __init__ re-exports its modules: importing it is not a cycle through them
    graph = {
        name: {i for i in imports if not name.startswith(i + ".")}
        for name, imports in graph.items()
    }
    cycles = []
    for start in sorted(graph):
        seen, stack = set(), [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*trail, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    assert not cycles, "modules that import each other:\n" + "\n".join(sorted(cycles)[:10])
