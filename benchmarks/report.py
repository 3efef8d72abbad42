"""Rewrite the README's benchmark table from the results in benchmarks/results/*.json.

Every result with ``headline`` rows (see `_report.headline`) gives one table row per headline:
what was measured, the command that measured it, the figure, the goal, whether it is met (and
where it is missed, what stands in the way), and the machine, date and load of the run. The table
replaces whatever stands between the markers ``<!-- bench:start -->`` and ``<!-- bench:end -->``;
the rest of the file is left as it is. Results of ``--quick`` runs are never shown. GPU results
(``*_cuda.json``, written by ``benchmarks/gpu.sh``) follow the CPU rows; without any, one row says
the GPU set was not run.

    python benchmarks/report.py [--results benchmarks/results] [--readme README.md] [--check]

``--check`` writes nothing and exits with status 1 when the README's table is not the one the
results give.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
HERE = Path(__file__).resolve().parent
# Table order: the questions in the order the README asks them; other results follow by name.
ORDER = (
    "bench_vs_llama",
    "bench_mfu",
    "bench_memory",
    "bench_capacity",
    "bench_depth",
    "bench_attention",
    "bench_favor",
    "bench_logging_overhead",
    "bench_quickstart",
    "bench_data",
)
GPU_NOT_RUN = "GPU: not run (no GPU on the machine that produced this table)"


class ReportError(Exception):
    """A problem with the README or a result file, worded for the user."""


def _cell(text: Any) -> str:
    """Markdown-table-safe text (pipes escaped, no line breaks)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def load_results(folder: Path) -> list[dict[str, Any]]:
    """The full (not quick) results with headline rows, in table order."""
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ReportError(f"{path}: not a readable JSON result ({error})") from None
        if not isinstance(data, dict) or data.get("quick") or not data.get("headline"):
            continue
        data.setdefault("benchmark", path.stem)
        results.append(data)
    rank = {name: index for index, name in enumerate(ORDER)}
    return sorted(
        results,
        key=lambda r: (on_gpu(r), rank.get(r["benchmark"], len(ORDER)), r["benchmark"]),
    )


def on_gpu(result: dict[str, Any]) -> bool:
    """Whether `result` was measured on a GPU (results from before devices were recorded are
    CPU results)."""
    return result.get("device", "cpu") != "cpu"


def render_table(results: list[dict[str, Any]]) -> str:
    """The Markdown table (with its one-line preamble) for `results`."""
    lines = [
        "Generated from `benchmarks/results/*.json` by `python benchmarks/report.py`; every row "
        "names the machine, date (and load average) and command of its run.",
        "",
        "| What | Result | Goal | Met | Command | Machine, date |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        run = result.get("run", {})
        load = run.get("load_average_at_start")
        where = f"{run.get('machine', '?')}, torch {run.get('torch', '?')}; {run.get('date', '?')}"
        if load:
            where += f"; load {load[0]:.1f}"
        for row in result["headline"]:
            if row.get("met") is None:
                met = "n/a"
            elif row["met"]:
                met = "yes"
            else:
                met = "**no**" + (f": {row['note']}" if row.get("note") else "")
            cells = [
                row["what"],
                row["figure"],
                row.get("goal") or "—",
                met,
                f"`{run.get('command', '?')}`",
                where,
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if not any(on_gpu(result) for result in results):
        cells = [GPU_NOT_RUN, "—", "—", "n/a", "`bash benchmarks/gpu.sh`", "—"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def rewrite(text: str, table: str, where: str = "README") -> str:
    """`text` with everything between the markers replaced by `table`."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start or text.count(START) != 1 or text.count(END) != 1:
        raise ReportError(
            f"{where}: needs exactly one '{START}' followed by one '{END}' around the "
            "benchmark table"
        )
    return text[: start + len(START)] + "\n" + table + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--readme", type=Path, default=HERE.parent / "README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the table is stale")
    args = parser.parse_args(argv)
    try:
        text = args.readme.read_text(encoding="utf-8")
        updated = rewrite(text, render_table(load_results(args.results)), str(args.readme))
    except OSError as error:
        print(f"report: {error}", file=sys.stderr)
        return 2
    except ReportError as error:
        print(f"report: {error}", file=sys.stderr)
        return 2
    if args.check:
        if updated != text:
            print(f"report: {args.readme}: benchmark table is out of date", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        args.readme.write_text(updated, encoding="utf-8")
    print(f"report: {args.readme}: benchmark table {'updated' if updated != text else 'current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
