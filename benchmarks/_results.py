"""Shared by the benchmark scripts: update one section of ``benchmarks/RESULTS.md``."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def update_section(section: str, path: Path = RESULTS, before: str | None = None) -> None:
    """Replace the section with ``section``'s ``## `` heading, keeping the others.

    A new section goes before the section whose heading starts with ``before`` (when there is
    one), else at the end.
    """
    heading = section.splitlines()[0]
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(heading + "\n")
    if start < 0:
        anchor = text.find("\n" + before) if before else -1
        if anchor < 0:
            text = text.rstrip("\n") + "\n\n" + section
        else:
            text = text[: anchor + 1] + section.rstrip("\n") + "\n\n" + text[anchor + 1 :]
    else:
        end = text.find("\n## ", start + len(heading))
        rest = "" if end < 0 else text[end + 1 :]
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    path.write_text(text)


def remove_section(heading: str, path: Path = RESULTS) -> None:
    """Drop the section with this ``## `` heading, if present."""
    if not path.exists():
        return
    text = path.read_text()
    start = text.find(heading + "\n")
    if start < 0:
        return
    end = text.find("\n## ", start + len(heading))
    text = text[:start] + ("" if end < 0 else text[end + 1 :])
    path.write_text(text.rstrip("\n") + "\n")
