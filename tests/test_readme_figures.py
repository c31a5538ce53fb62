"""The README stays a short user guide whose figures come from the benchmarks.

- Every figure in the README's "## Measured results" table is one that the summary table of
  ``benchmarks/RESULTS.md`` (written by ``make bench``) gives for the same benchmark, so a re-run
  that changes a figure fails here until the README row is copied again.
- Every relative link or image in ``README.md`` and ``docs/**/*.md`` names a file inside the
  repository.
- ``README.md`` stays at most 15 KB; details live under ``docs/``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
MAX_README_BYTES = 15 * 1024
RESULTS_HEADING = "## Measured results"

#: a figure: an optional sign, digits (thousands with commas), decimals, and a unit glued to it
FIGURE = re.compile(
    r"(?<![\w.])[+\-\u2212]?\d{1,3}(?:,\d{3})+(?:\.\d+)?[%\u00d7x]?"
    r"|(?<![\w.])[+\-\u2212]?\d+(?:\.\d+)?[%\u00d7x]?(?![\w])"
)
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.MULTILINE)
HTML_LINK = re.compile(r"\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def figures(text: str) -> list[str]:
    """The number tokens of ``text`` (``90.9%``, ``1.43×``, ``+0.0``, ``953``), minus signs
    written as ``-``."""
    return [token.replace("\u2212", "-") for token in FIGURE.findall(text)]


def table_rows(lines: list[str]) -> dict[str, str]:
    """``{first cell: second cell}`` of the first Markdown table in ``lines`` (header and
    separator rows left out)."""
    rows: dict[str, str] = {}
    started = False
    for line in lines:
        if not line.lstrip().startswith("|"):
            if started:
                break
            continue
        started = True
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if all(re.fullmatch(r":?-{3,}:?", cell) for cell in cells if cell):
            continue
        if len(cells) < 2 or cells[0].lower() == "benchmark":
            continue
        rows[cells[0]] = cells[1]
    return rows


def summary_rows(results_text: str) -> dict[str, str]:
    """The ``| benchmark | result |`` summary table of RESULTS.md."""
    lines = results_text.splitlines()
    for index, line in enumerate(lines):
        cells = [cell.strip().lower() for cell in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells[:2] == ["benchmark", "result"]:
            return table_rows(lines[index:])
    raise AssertionError("benchmarks/RESULTS.md has no '| benchmark | result |' summary table")


def measured_rows(readme_text: str) -> dict[str, str]:
    """The table under the README's "## Measured results" heading."""
    lines = readme_text.splitlines()
    if RESULTS_HEADING not in lines:
        raise AssertionError(f"README.md has no {RESULTS_HEADING!r} section")
    start = lines.index(RESULTS_HEADING) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return table_rows(lines[start:end])


def figure_mismatches(readme_text: str, results_text: str) -> list[str]:
    """What in the README's results table the RESULTS.md summary does not back: a row whose
    label is not a summary row, or a figure its summary row does not give."""
    summary = summary_rows(results_text)
    problems = []
    for label, result in measured_rows(readme_text).items():
        if label not in summary:
            problems.append(f"row {label!r} is not in the summary table of benchmarks/RESULTS.md")
            continue
        known = set(figures(summary[label]))
        for figure in figures(result):
            if figure not in known:
                problems.append(
                    f"row {label!r}: {figure!r} is not in RESULTS.md's {summary[label]!r}"
                )
    return problems


def relative_links(markdown: str) -> list[str]:
    """Targets of the links and images of a Markdown page outside code, that name a path
    (web addresses, mail addresses and same-page anchors left out; fragments cut off)."""
    text = INLINE_CODE.sub("", FENCE.sub("", markdown))
    targets = [
        *INLINE_LINK.findall(text),
        *REFERENCE_LINK.findall(text),
        *HTML_LINK.findall(text),
    ]
    found = []
    for target in targets:
        if re.match(r"^(?:[a-z][a-z0-9+.-]*:|//|#)", target, re.IGNORECASE):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path:
            found.append(path)
    return found


def broken_links(page: Path, markdown: str, root: Path = ROOT) -> list[str]:
    """Relative links of ``page`` that name no file inside ``root``."""
    problems = []
    for target in relative_links(markdown):
        resolved = (page.parent / target).resolve()
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{page.name}: {target!r} points outside the repository")
        elif not resolved.exists():
            problems.append(f"{page.name}: {target!r} does not exist")
    return problems


def test_readme_results_table_matches_benchmarks() -> None:
    readme, results = README.read_text(), RESULTS.read_text()
    rows = measured_rows(readme)
    assert rows, "the README's results table has no rows"
    assert all(figures(result) for result in rows.values()), "a results row without figures"
    assert figure_mismatches(readme, results) == []


def test_the_figure_check_catches_a_changed_figure() -> None:
    results = RESULTS.read_text()
    label, result = next(iter(summary_rows(results).items()))
    first = figures(result)[0]
    changed = result.replace(first, "9" + first.lstrip("+-"), 1)  # 1.04× -> 91.04×
    table = f"{RESULTS_HEADING}\n\n| benchmark | result |\n|---|---|\n| {label} | {changed} |\n"
    assert figure_mismatches(table, results) != []
    same = f"{RESULTS_HEADING}\n\n| benchmark | result |\n|---|---|\n| {label} | {result} |\n"
    assert figure_mismatches(same, results) == []
    unknown = f"{RESULTS_HEADING}\n\n| benchmark | result |\n|---|---|\n| No such row | 1.0× |\n"
    assert figure_mismatches(unknown, results) != []


def test_figures_are_read_with_sign_and_unit() -> None:
    assert figures("free 0.51×, pro +0.0 points, −5.8, 953/953 answered, 1,348 images, 90.9%") == [
        "0.51×",
        "+0.0",
        "-5.8",
        "953",
        "953",
        "1,348",
        "90.9%",
    ]


def test_relative_links_resolve_inside_the_repository() -> None:
    problems = [problem for page in PAGES for problem in broken_links(page, page.read_text())]
    assert problems == []


def test_the_link_check_catches_missing_and_outside_files() -> None:
    page = ROOT / "docs" / "example.md"
    markdown = (
        "[ok](../README.md) ![pic](owner-page.png) [web](https://example.com/x.md) [here](#top)\n"
        "[gone](missing.md#part) [out](../../shared/DESIGN.md)\n"
        "```bash\n[not a link](nowhere.md)\n```\n"
    )
    problems = broken_links(page, markdown)
    assert len(problems) == 2, problems
    assert "missing.md" in problems[0] and "outside" in problems[1]


def test_readme_is_a_short_guide() -> None:
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move details to docs/"
