"""Shared by the benchmark scripts: update one section of ``benchmarks/RESULTS.md``."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def update_section(section: str) -> None:
    """Replace the section with ``section``'s ``## `` heading (or append it), keeping the others."""
    heading = section.splitlines()[0]
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        rest = "" if end < 0 else text[end + 1 :]
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    RESULTS.write_text(text)
