"""What a `stackwise run` reports: what happened to every grid point (`RunSummary`), each
grid's comparison table (printed, and logged with its plots on the grid's parent run) and, at the
end, the counts and a table of the points that failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from stackwise.tracking.progress import GridProgress, plain
from stackwise.tracking.store import retry_locked

if TYPE_CHECKING:
    from stackwise.runner.grid import Grid

Outcome = tuple[str, str, str]  # (experiment name, run name, message)


@dataclass
class RunSummary:
    """What happened to every grid point of a `stackwise run`."""

    finished: list[Outcome] = field(default_factory=list)
    skipped: list[Outcome] = field(default_factory=list)
    failed: list[Outcome] = field(default_factory=list)
    run_ids: dict[tuple[str, str], str] = field(default_factory=dict)  # (experiment, run) -> id
    parent_run_ids: dict[str, str] = field(default_factory=dict)  # experiment -> parent run id

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def finish_grid(grid: Grid, progress: GridProgress) -> None:
    """The comparison table (printed, and saved with plots as parent-run artifacts)."""
    import tempfile

    import polars as pl

    from stackwise.tracking.compare import (
        headline_frame,
        render,
        runs_frame,
        save_plots,
        to_markdown,
    )
    from stackwise.tracking.ui import VIEW_TAG, runs_view

    order = [grid.point_run_ids[s.name] for s in grid.specs if s.name in grid.point_run_ids]
    if not order:
        return
    frame = runs_frame(
        grid.client, {grid.experiment_id: grid.name}, run_ids=order, latest_only=False
    )
    position = {run_id: index for index, run_id in enumerate(order)}
    frame = (
        frame.with_columns(
            pl.col("run_id").replace_strict(position, default=len(order)).alias("_order")
        )
        .sort("_order")
        .drop("_order")
    )
    # A grid with nothing to train has no parent run of its own: its earlier one has these.
    if grid.parent_run_id:
        with tempfile.TemporaryDirectory(prefix="stackwise-compare-") as temp:
            folder = Path(temp)
            (folder / "comparison.csv").write_text(frame.write_csv(), encoding="utf-8")
            (folder / "comparison.md").write_text(
                to_markdown(frame.drop("run_id", "parent_run_id", "config_hash", "start_time")),
                encoding="utf-8",
            )
            try:
                save_plots(grid.client, frame, folder)
            except Exception as error:  # a plot must never cost the grid its table
                progress.print(f"  [yellow]plots skipped: {plain(error)}[/]")
            retry_locked(lambda: grid.client.log_artifacts(grid.parent_run_id, str(folder)))
    axes = list(grid.specs[0].coordinates) if grid.specs else []
    view = runs_view(axes)
    retry_locked(lambda: grid.client.set_experiment_tag(grid.experiment_id, VIEW_TAG, view))
    render(
        headline_frame(frame),
        "table",
        console=progress.console,
        title=f"{grid.name}: comparison (stackwise compare --columns all: every column)",
        short=True,
    )


def print_summary(summary: RunSummary, console: Console) -> None:
    """The counts of what happened, after a table of the points that failed (the comparison
    table has shown the others, and each skipped point had its line)."""
    from stackwise.tracking.tables import Column, print_table

    if summary.failed:
        print_table(
            console,
            [Column("experiment", key=True), Column("run", key=True), Column("error")],
            [list(outcome) for outcome in summary.failed],
            title="failed points",
        )
    counts = (
        f"{len(summary.finished)} finished, {len(summary.skipped)} skipped, "
        f"{len(summary.failed)} failed"
    )
    console.print(counts if not summary.failed else f"[red]{counts}[/]")
