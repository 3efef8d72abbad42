"""Reshaping a comparison frame: the columns asked for (`--columns`), and pivots (`--pivot`)
whose cells hold one run each, or several combined over seeds and reruns (`--agg`)."""

from __future__ import annotations

import re
from typing import Any, Literal, cast

import polars as pl

from stackwise.tracking.compare.common import (
    AGGREGATIONS,
    KEY_COLUMNS,
    RESULT_COLUMNS,
    RUN_BOOKKEEPING,
    CompareError,
    plural,
    resolve_metric,
)
from stackwise.tracking.compare.formatting import format_cell

#: The results a terminal table shows by default (`headline_frame`).
HEADLINE_RESULTS = ("val_loss", "test_loss", "flops", "training_memory_mb", "wall_time_s")


def headline_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """What a terminal table shows unless `--columns` asks for more: the grid coordinates that
    differ between the rows (the run name only where they do not tell every row apart, as
    in an ``--all`` frame), the status where a run did not finish, and `HEADLINE_RESULTS`."""
    shown_results = {*RESULT_COLUMNS, *HEADLINE_RESULTS}
    derived = tuple(f"{name}_" for name in shown_results)
    candidates = [
        c
        for c in frame.columns
        if c not in shown_results
        and c not in RUN_BOOKKEEPING
        and c not in KEY_COLUMNS
        and c not in ("point", "n", "start_time", "config_hash", "tuned_axes")
        and not c.startswith(derived)
        and "." not in c  # the differing params of an --all frame
    ]
    if "mode" in candidates and "training_architecture" in candidates:
        candidates.remove("training_architecture")  # the mode axis says it
    # A setting that only some runs have (the depth-wise head) tells nothing apart.
    varying = [c for c in candidates if frame[c].drop_nulls().n_unique() > 1]
    keys = [c for c in ("experiment",) if c in frame.columns and frame[c].n_unique() > 1]
    identified = bool(varying) and frame.select([*keys, *varying]).is_unique().all()
    if not identified:
        keys += [c for c in ("run", "point") if c in frame.columns][:1]
    if "status" in frame.columns and (frame["status"] != "FINISHED").any():
        varying.append("status")
    results = [c for c in HEADLINE_RESULTS if c in frame.columns]
    return frame.select([*keys, *varying, *results])


def select_columns(frame: pl.DataFrame, columns: str) -> pl.DataFrame:
    """The columns named in `columns` (comma-separated), in that order, behind the columns that
    say which run a row is: experiment and run (or a pivot's rows) and, in an ``--all`` frame,
    the params that differ between runs of one grid point and ``current`` — without them two
    runs of one point would print as the same row. Unknown names are a `CompareError` listing
    the columns there are."""
    wanted = [c.strip() for c in columns.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in frame.columns]
    if unknown:
        raise CompareError(
            f"--columns: no column {', '.join(repr(c) for c in unknown)}; the table has "
            f"{', '.join(frame.columns)}"
        )
    keep = [c for c in KEY_COLUMNS if c in frame.columns] or frame.columns[:1]
    if "current" in frame.columns:  # an --all frame: differing params (dotted keys), current
        before = frame.columns[: frame.columns.index("current")]
        keep += [c for c in before if "." in c and c not in keep] + ["current"]
    return frame.select([*keep, *[c for c in wanted if c not in keep]])


def parse_pivot(text: str) -> tuple[str, str]:
    """``"size x mode"``, ``"size,mode"`` or ``"size×mode"`` -> ("size", "mode")."""
    parts = [p for p in re.split(r"\s*(?:,|×|\s+x\s+|\s+)\s*", text.strip()) if p]
    if len(parts) != 2:
        raise CompareError(
            f"--pivot needs two columns, e.g. 'size x mode' or 'size,mode'; got {text!r}"
        )
    return parts[0], parts[1]


def pivot_frame(
    frame: pl.DataFrame, pivot: str, metric: str | None = None, agg: str | None = None
) -> pl.DataFrame:
    """Rows = first pivot column, columns = second, cells = `metric` (default val_loss).

    A cell holding more than one run is a `CompareError` naming what differs inside it (other
    axes, params, or reruns of the same settings), unless `agg` (mean, min, max, std, sem,
    count, or last: the latest started run) says how to combine them.
    """
    rows, columns = parse_pivot(pivot)
    value = resolve_metric(metric)
    for name in (rows, columns, value):
        if name not in frame.columns:
            raise CompareError(
                f"unknown column {name!r} for --pivot/--metric; columns: {', '.join(frame.columns)}"
            )
    if agg is not None and agg not in AGGREGATIONS:
        raise CompareError(f"--agg {agg}: use one of {', '.join(AGGREGATIONS)}")
    if agg is None:
        crowded = frame.group_by(rows, columns, maintain_order=True).len().filter(pl.col("len") > 1)
        if crowded.height:
            raise CompareError(_crowded_cells(frame, rows, columns, value, crowded, pivot))
    how: Any = cast(Literal["first", "mean", "min", "max", "last"], agg or "first")
    if agg == "std":
        how = pl.element().std()
    elif agg == "sem":
        how = pl.element().std() / pl.element().count().sqrt()
    elif agg == "count":
        how = "len"
    if agg != "last" or "start_time" not in frame.columns:
        return frame.pivot(
            on=columns, index=rows, values=value, aggregate_function=how, sort_columns=False
        )
    # The latest started run of each cell; rows and columns keep the frame's order.
    row_order = frame[rows].unique(maintain_order=True).to_list()
    column_order = [str(c) for c in frame[columns].unique(maintain_order=True).to_list()]
    latest = frame.sort("start_time", maintain_order=True, nulls_last=False)
    table = latest.pivot(on=columns, index=rows, values=value, aggregate_function="last")
    position = {key: index for index, key in enumerate(row_order)}
    return (
        table.with_columns(pl.col(rows).replace_strict(position, default=None).alias("_order"))
        .sort("_order")
        .select(rows, *[c for c in column_order if c in table.columns])
    )


def _crowded_cells(
    frame: pl.DataFrame,
    rows: str,
    columns: str,
    value: str,
    crowded: pl.DataFrame,
    pivot: str,
) -> str:
    """One line: which pivot cells hold several runs, and the columns whose values differ."""
    candidates = [
        c
        for c in frame.columns
        if c not in (rows, columns, value, *RUN_BOOKKEEPING)
        and c not in RESULT_COLUMNS
        and not frame.schema[c].is_numeric()
    ]
    differing: dict[str, list[str]] = {}
    hashes_differ = False
    for cell in crowded.iter_rows(named=True):
        inside = frame.filter(
            pl.col(rows).eq_missing(cell[rows]) & pl.col(columns).eq_missing(cell[columns])
        )
        for column in candidates:
            values = [format_cell(v) for v in inside[column].unique(maintain_order=True).to_list()]
            if len(values) > 1:
                seen = differing.setdefault(column, [])
                seen.extend(v for v in values if v not in seen)
        if "config_hash" in inside.columns and inside["config_hash"].n_unique() > 1:
            hashes_differ = True
    if differing:
        what = "; ".join(f"{c} ({', '.join(v)})" for c, v in differing.items())
    elif hashes_differ:
        what = "settings outside the table (config_hash; compare --all shows the params)"
    else:
        what = "nothing but their start time (reruns of the same settings)"
    first = crowded.row(0, named=True)
    cells = plural(crowded.height, "cell")
    return (
        f"--pivot {pivot}: {cells} hold several runs (e.g. {rows}={first[rows]}, "
        f"{columns}={first[columns]}: {first['len']} runs); they differ in {what}. Keep one run "
        f"per cell with --only, or combine them with --agg {'|'.join(AGGREGATIONS)}"
    )
