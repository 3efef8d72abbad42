"""Tables for people that never cut a run name or a number.

`print_table` prints rows of already formatted cells:

- Output that is not a terminal (a pipe, a file, CI logs) gets plain full rows: the columns
  padded to their widest cell and separated by two spaces, however wide that makes a line, so
  that `grep` and `cut` see every value whole.
- A terminal gets a rich table. When the columns do not fit its width, they are folded into
  several tables, one after the other, each repeating the key columns (experiment, run) so a
  row is still found by name. Numbers never wrap; only text that is wider than the whole
  terminal is folded onto a second line, never cut with an ellipsis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

# Rich's default box: a column takes its content + 2 padding + 1 rule; the table 1 more rule.
_COLUMN_OVERHEAD = 3
_TABLE_OVERHEAD = 1


@dataclass(frozen=True)
class Column:
    header: str
    numeric: bool = False  # right-aligned, never wrapped
    key: bool = False  # repeated in every folded part (experiment, run)


def column_width(column: Column, cells: Sequence[str]) -> int:
    """Width of the widest line of the header and the cells."""
    texts = [column.header, *cells]
    return max(len(line) for text in texts for line in (text.splitlines() or [""]))


def fold_columns(widths: Sequence[int], keys: Sequence[int], width: int) -> list[list[int]]:
    """Groups of column indices, in order, each fitting `width` with the `keys` columns
    repeated at its start (a group holds at least one other column, even when too wide)."""
    others = [i for i in range(len(widths)) if i not in keys]
    base = _TABLE_OVERHEAD + sum(widths[i] + _COLUMN_OVERHEAD for i in keys)
    groups: list[list[int]] = []
    current: list[int] = []
    used = base
    for index in others:
        need = widths[index] + _COLUMN_OVERHEAD
        if current and used + need > width:
            groups.append(current)
            current, used = [], base
        current.append(index)
        used += need
    if current or not groups:
        groups.append(current)
    return [sorted([*keys, *group]) for group in groups]


def plain_lines(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> list[str]:
    """Header and rows as padded plain text (full cells, two spaces between columns)."""
    widths = [column_width(c, [r[i] for r in rows]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if columns[i].numeric else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    return [line([c.header for c in columns]), *(line(row) for row in rows)]


def print_table(
    console: Console,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    title: str | None = None,
    styles: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Print `rows` (one formatted string per column) without cutting any cell.

    `styles` maps a column header to {cell text: rich style} (e.g. status colours); used on a
    terminal only.
    """
    if not console.is_terminal:
        if title:
            console.print(Text(title), soft_wrap=True)
        for line in plain_lines(columns, rows):
            console.print(Text(line), soft_wrap=True)
        return
    widths = [column_width(c, [r[i] for r in rows]) for i, c in enumerate(columns)]
    keys = [i for i, c in enumerate(columns) if c.key]
    groups = fold_columns(widths, keys, console.width)
    for number, group in enumerate(groups):
        shown = title
        if title and len(groups) > 1:
            shown = f"{title} ({number + 1}/{len(groups)})"
        table = Table(title=shown, title_justify="left")
        for index in group:
            column = columns[index]
            if column.numeric:
                table.add_column(
                    column.header, justify="right", no_wrap=True, min_width=widths[index]
                )
            else:
                table.add_column(column.header, overflow="fold")
        for row in rows:
            cells = []
            for index in group:
                style = (styles or {}).get(columns[index].header, {}).get(row[index])
                cells.append(Text(row[index], style=style or ""))
            table.add_row(*cells)
        console.print(table)
