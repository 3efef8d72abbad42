"""A comparison frame for people and files: the columns a table shows, cells formatted for
reading, and `render` in each of `FORMATS` (rich table, CSV, Markdown, JSON, Parquet)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from stackwise.tracking.compare.common import FORMATS, KEY_COLUMNS, TUNED_AXES, CompareError
from stackwise.tracking.tables import Column, print_table

if TYPE_CHECKING:
    from rich.console import Console

# Columns that matter for reading a table; ids are left out of `table`/`markdown`, and the
# start time and config hash too unless every run is shown (`--all`).
HIDDEN_IN_TABLES = ("run_id", "parent_run_id", TUNED_AXES)
SHOWN_WITH_ALL = ("start_time", "config_hash")
STATUS_STYLES = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow", "RUNNING": "cyan"}


def display_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """What a human table shows: no ids, no experiment column for a single experiment, and no
    ``training_architecture`` column when a ``mode`` axis already says it. A frame of every run
    (it has the ``current`` column) keeps start time and config hash, which tell its runs apart."""
    hidden = [c for c in HIDDEN_IN_TABLES if c in frame.columns]
    if "current" not in frame.columns:
        hidden.extend(c for c in SHOWN_WITH_ALL if c in frame.columns)
    if "experiment" in frame.columns and frame["experiment"].n_unique() <= 1:
        hidden.append("experiment")
    if "mode" in frame.columns and "training_architecture" in frame.columns:
        hidden.append("training_architecture")
    return frame.drop(hidden)


def format_cell(value: Any) -> str:
    """A frame value as a table shows it: ``-`` for none, four decimals or engineering notation
    for floats, thousands separators for large numbers."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        magnitude = abs(value)
        if magnitude >= 1e6 or (0 < magnitude < 1e-3):
            return f"{value:.3e}"
        if magnitude >= 100:
            return f"{value:,.0f}"
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_short(value: Any) -> str:
    """A frame value as a terminal table shows it: floats to four significant digits (1.606,
    20.56, 8.665; engineering notation outside 1e-3 .. 1e6, thousands separators from 1,000 up);
    everything else as `format_cell`."""
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        magnitude = abs(value)
        if 1e-3 <= magnitude < 1000:
            decimals = max(0, 3 - math.floor(math.log10(magnitude)))
            return f"{value:.{decimals}f}"
        if 1000 <= magnitude < 1e6:
            return f"{value:,.0f}"
    if isinstance(value, float) and value == 0:
        return "0"
    return format_cell(value)


def to_markdown(frame: pl.DataFrame) -> str:
    """The frame as a Markdown table, its cells formatted as in `table_cells` (pipes escaped)."""
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    lines = [header, rule]
    for row in frame.iter_rows():
        lines.append("| " + " | ".join(format_cell(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def table_cells(frame: pl.DataFrame, short: bool = False) -> tuple[list[Column], list[list[str]]]:
    """The frame as table columns and formatted cells (numbers right-aligned, names as keys);
    `short`: numbers to four significant digits (`format_short`)."""
    columns = [
        Column(name, numeric=frame.schema[name].is_numeric(), key=name in KEY_COLUMNS)
        for name in frame.columns
    ]
    cell = format_short if short else format_cell
    rows = [[cell(value) for value in row] for row in frame.iter_rows()]
    return columns, rows


def print_frame(
    frame: pl.DataFrame, console: Console, title: str | None = None, short: bool = False
) -> None:
    """The frame as a table that never cuts a run name or a number (see `print_table`)."""
    columns, rows = table_cells(frame, short)
    print_table(console, columns, rows, title=title, styles={"status": STATUS_STYLES})


def render(
    frame: pl.DataFrame,
    fmt: str,
    output: str | Path | None = None,
    console: Console | None = None,
    title: str | None = None,
    short: bool = False,
) -> str | None:
    """Write `frame` in `fmt` to `output` (a file) or return/print it.

    ``table`` prints a rich table to `console`; ``csv``, ``markdown`` and ``json`` return the
    text (and also write it when `output` is given); ``parquet`` needs `output`. `short`
    prints a table's numbers to four significant digits.
    """
    if fmt not in FORMATS:
        raise CompareError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        if output is None:
            raise CompareError("--format parquet writes a binary file: give --output PATH")
        frame.write_parquet(output)
        return None
    if fmt == "table":
        from rich.console import Console

        shown = display_frame(frame)
        if output is not None:
            with open(output, "w", encoding="utf-8") as handle:
                print_frame(shown, Console(file=handle), title, short)  # a file: plain rows
            return None
        print_frame(shown, console or Console(), title, short)
        return None
    if fmt == "csv":
        text = frame.write_csv()
    elif fmt == "markdown":
        text = to_markdown(display_frame(frame))
    else:
        text = frame.write_json()
    if output is not None:
        Path(output).write_text(text, encoding="utf-8")
    return text
