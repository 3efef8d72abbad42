"""What a `stackwise run` reports: what happened to every grid point (`RunSummary`), each
grid's comparison table (printed, and logged with its plots on the grid's parent run) and the
summary table at the end.
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

    from stackwise.tracking.compare import render, runs_frame, save_plots, to_markdown

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
    render(frame, "table", console=progress.console, title=f"{grid.name}: comparison")


def print_summary(summary: RunSummary, console: Console) -> None:
    """Every point's outcome as a table, then the counts (in red when a point failed)."""
    from rich.table import Table

    table = Table(title="stackwise run: summary")
    table.add_column("experiment")
    table.add_column("run")
    table.add_column("outcome")
    table.add_column("details")
    for outcomes, label in (
        (summary.finished, "[green]finished[/]"),
        (summary.skipped, "[dim]skipped[/]"),
        (summary.failed, "[red]FAILED[/]"),
    ):
        for experiment, run, message in outcomes:
            table.add_row(plain(experiment), plain(run), label, plain(message))
    console.print(table)
    counts = (
        f"{len(summary.finished)} finished, {len(summary.skipped)} skipped, "
        f"{len(summary.failed)} failed"
    )
    console.print(counts if not summary.failed else f"[red]{counts}[/]")
