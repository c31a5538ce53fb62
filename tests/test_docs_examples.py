"""Every ```python block of the README and of the Markdown pages under docs/ runs as written.

Each block runs alone in a fresh interpreter, offline, in a temporary directory with its own
cache (``NNOBF_HOME``, shared by the blocks of one test run so a demo model trains once) and the
zoo in quick mode (``NNOBF_ZOO_QUICK=1``: demo models train for seconds). A block that needs what
no machine here has (a GPU, a diffusers checkpoint) carries a marker on the line before it,
``<!-- example: skip: the reason -->``; nothing else is skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nnobfuscator.zoo.fashion import fashion_mnist_available, missing_message

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"<!--\s*example:\s*skip:\s*(.+?)\s*-->")
TIMEOUT_S = 600


def python_blocks(page: Path) -> list[tuple[str, int, str, str | None]]:
    """``(id, line, code, skip reason)`` of each ```python block of ``page``."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        name = f"{page.relative_to(ROOT)}:{line}"
        blocks.append((name, line, match.group(1), skip.group(1) if skip else None))
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]


def test_the_readme_has_python_examples() -> None:
    assert any(name.startswith("README.md:") for name, *_ in BLOCKS)


def test_skip_markers_name_a_reason_no_machine_here_meets() -> None:
    """Only blocks that need a GPU or a downloaded checkpoint may be skipped."""
    for name, _, _, reason in BLOCKS:
        if reason is not None:
            assert re.search(r"GPU|CUDA|checkpoint", reason), f"{name}: skipped for {reason!r}"


@pytest.fixture(scope="module")
def example_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("examples-home")
    return {
        **os.environ,
        "NNOBF_HOME": str(home),
        "NNOBF_ZOO_QUICK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "MPLBACKEND": "Agg",
    }


@pytest.mark.parametrize(("name", "line", "code", "skip"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_example_runs_as_written(name, line, code, skip, example_env, tmp_path) -> None:
    if skip is not None:
        pytest.skip(skip)
    if "fashion_mnist" in code and not fashion_mnist_available():
        pytest.skip(missing_message())
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=example_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}{result.stderr[-5000:]}"
