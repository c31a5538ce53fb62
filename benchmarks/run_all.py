"""``make bench``: every benchmark section in one run; writes ``benchmarks/RESULTS.md`` (one
section each, plus machine and summary) and ``benchmarks/SUMMARY.md`` (the README table).

Run: ``python benchmarks/run_all.py [--only SECTION ...]``. ``BENCH_QUICK=1`` runs a few repeats
only (a smoke test: numbers mean nothing) and writes to a scratch folder unless ``--out`` says
otherwise. Demo models train on first use and are cached under ``$NNOBF_HOME``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bench_aim
import bench_calibration
import bench_generation
import bench_latency
import bench_memory
import bench_mixed
import bench_overload
import bench_plan_model
import bench_sealed
import bench_serving
import bench_withholding
from _common import QUICK, Section, machine
from _results import remove_section, update_section

HERE = Path(__file__).parent
HEADING = "## Summary and machine (`make bench`)"
#: sections in run order (the ones that share calibrated models come together)
SECTIONS: dict[str, Callable[[], Section]] = {
    "memory": bench_memory.run,
    "latency": bench_latency.run,
    "mixed": bench_mixed.run,
    "calibration": bench_calibration.run,
    "serving": lambda: bench_serving.run_section(QUICK),
    "aim": bench_aim.run,
    "overload": lambda: bench_overload.run_section(QUICK),
    "plan-model": bench_plan_model.run,
    "withholding": bench_withholding.run,
    "sealed": bench_sealed.run,
    "generation": bench_generation.run,
}
#: sections of scripts this harness replaced
_RETIRED = (
    "## Forward time of a tier vs the plain model (`benchmarks/bench_forward.py`)",
    "## Compute-saving tiers: wall time per batch vs the full model (`benchmarks/bench_compute.py`)",
)
#: new sections go before the hand-run ones (any model, text-to-image, attacks)
_BEFORE = "## Any model"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def summary_table(results: dict) -> list[str]:
    lines = ["| benchmark | result |", "|---|---|"]
    for name in SECTIONS:
        for label, value in results.get(name, {}).get("summary", []):
            lines.append(f"| {label} | {value} |")
    return lines


def header(results: dict, command: str) -> str:
    """The RESULTS.md section with the machine, the command and the summary table."""
    facts = machine()
    gpu = f", GPU {facts['gpu']}" if "gpu" in facts else ""
    lines = [
        HEADING,
        "",
        f"Command: `{command}`. Last run {facts['date']} on {facts['cpu']} ({facts['machine']}, "
        f"{facts['cores']} cores{gpu}), {facts['threads']} torch threads, Python "
        f"{facts['python']}, torch {facts['torch']}, torchvision {facts['torchvision']}. Ratios "
        "compare runs timed in the same process, interleaved; times are medians of repeats.",
        "",
        "| section | measured | wall time (s) | threads | load average at start |",
        "|---|---|---|---|---|",
    ]
    for name in SECTIONS:
        if name in results:
            r = results[name]
            m = r["machine"]
            quick = " (BENCH_QUICK)" if m.get("quick") else ""
            lines.append(
                f"| {name} | {m['date']}{quick} | {r['seconds']:.0f} | {m['threads']} | "
                f"{m['load_average']} |"
            )
    return "\n".join([*lines, "", *summary_table(results)]) + "\n"


def write_summary(results: dict, path: Path) -> None:
    facts = machine()
    lines = [
        "<!-- written by `make bench` (benchmarks/run_all.py); details in benchmarks/RESULTS.md -->",
        "",
        *summary_table(results),
        "",
        f"Measured with `make bench` on {facts['cpu']}, {facts['threads']} threads, torch "
        f"{facts['torch']} (details and every table: `benchmarks/RESULTS.md`).",
    ]
    path.write_text("\n".join(lines) + "\n")


def _anchor(name: str, results: dict, path: Path) -> str:
    """The heading a section goes before: the next section in SECTIONS order already written."""
    text = path.read_text() if path.exists() else ""
    later = list(SECTIONS)[list(SECTIONS).index(name) + 1 :]
    for other in later:
        heading = results.get(other, {}).get("heading")
        if heading and heading + "\n" in text:
            return heading
    return _BEFORE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", action="append", choices=list(SECTIONS), help="Run this section (repeatable)."
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="Folder for RESULTS.md, SUMMARY.md and results.json "
        "(default: benchmarks/, or a scratch folder under BENCH_QUICK=1).",
    )
    args = parser.parse_args()
    out = args.out or (Path(tempfile.gettempdir()) / "nnobf-bench-quick" if QUICK else HERE)
    out.mkdir(parents=True, exist_ok=True)
    results_md, summary_md, raw = out / "RESULTS.md", out / "SUMMARY.md", out / "results.json"
    if out != HERE and not results_md.exists() and (HERE / "RESULTS.md").exists():
        results_md.write_text((HERE / "RESULTS.md").read_text())
    command = (
        "make bench"
        if not args.only and not QUICK
        else " ".join(
            (["BENCH_QUICK=1"] if QUICK else [])
            + ["python", "benchmarks/run_all.py", *sys.argv[1:]]
        )
    )
    for heading in _RETIRED:
        remove_section(heading, results_md)
    results = _load(raw)
    for name in args.only or list(SECTIONS):
        print(f"== {name}", flush=True)
        facts = machine()
        started = time.perf_counter()
        section = SECTIONS[name]()
        seconds = time.perf_counter() - started
        print(section.markdown, flush=True)
        print(f"== {name}: {seconds:.0f} s", flush=True)
        results[name] = {
            "machine": facts,
            "seconds": seconds,
            "summary": section.summary,
            "data": section.data,
        }
        heading = section.markdown.splitlines()[0]
        results[name]["heading"] = heading
        remove_section(heading, results_md)  # then placed in SECTIONS order
        update_section(section.markdown, results_md, before=_anchor(name, results, results_md))
        raw.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
        update_section(header(results, command), results_md, before="## ")
        write_summary(results, summary_md)
    print(f"wrote {results_md}, {summary_md} and {raw}")


if __name__ == "__main__":
    main()
