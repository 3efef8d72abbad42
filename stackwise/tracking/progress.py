"""Terminal progress of a grid: runs done / total, and the current run's stage, step and loss.

`GridProgress` owns one rich `Progress` with two bars — the grid and the run in flight — and
hands out a `RunProgress` callback per grid point, which the trainer drives. With ``quiet`` there
are no bars and only important status lines (failures) are printed; the runner still prints the
comparison and the final summary. Where the output is not a terminal (CI logs, pipes) bars are
not redrawn, so each finished stage is reported as a plain line instead.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from stackwise.training.callbacks import StageInfo, StageResult, TrainingCallback, TrainingResults


def plain(text: object) -> str:
    """`text` as it reads, for a rich markup string: brackets in run names, paths and error
    messages (`[/x]`, `[bold]`, a gloo error's `[/__w/…]`) are shown, never interpreted."""
    from rich.markup import escape

    return escape(str(text))


class RunProgress(TrainingCallback):
    """Progress bar of one training run: stage, step, loss, tokens/s and ETA; with `log`, also
    one line per finished stage (for output that is not a terminal)."""

    def __init__(
        self,
        progress: Progress | None,
        task: TaskID | None,
        name: str,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.progress = progress
        self.task = task
        self.name = name
        self.log = log
        self.stage = ""
        self.loss = float("nan")
        self.tokens_per_s = 0.0

    def _update(self, **fields: float | str | None) -> None:
        if self.progress is None or self.task is None:
            return
        description = (
            f"[cyan]{plain(self.name)}[/] {plain(self.stage)}  loss {self.loss:.4f}  "
            f"{self.tokens_per_s:,.0f} tok/s"
        )
        self.progress.update(self.task, description=description, **fields)  # type: ignore[arg-type]

    def on_train_start(self, stages: list[StageInfo]) -> None:
        self._update(total=sum(s.steps for s in stages))

    def on_stage_start(self, stage: StageInfo, step: int) -> None:
        self.stage = f"stage {stage.index + 1}/{stage.total_stages} {stage.name}"
        self._update(completed=step)

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.loss = metrics.get("train/loss", self.loss)
        self.tokens_per_s = metrics.get("train/tokens_per_s", self.tokens_per_s)
        self._update(completed=step)

    def on_stage_end(self, result: StageResult, step: int) -> None:
        self._update(completed=step)
        if self.log is not None:
            stage = result.stage
            loss = "" if result.val_loss is None else f", val loss {result.val_loss:.4f}"
            self.log(
                f"    {plain(self.name)}: stage {stage.index + 1}/{stage.total_stages} "
                f"{plain(stage.name)} "
                f"done at step {step}: train loss {result.train_loss:.4f}{loss}, "
                f"{result.tokens_per_s:,.0f} tok/s"
            )

    def on_train_end(self, results: TrainingResults) -> None:
        self._update(completed=results.total_steps)


class GridProgress:
    """Both bars of a `stackwise run`; use as a context manager around the whole grid."""

    def __init__(self, total_runs: int, quiet: bool = False, console: Console | None = None):
        self.console = console or Console()
        self.quiet = quiet
        self.progress: Progress | None = None
        self.grid_task: TaskID | None = None
        self.run_task: TaskID | None = None
        if not quiet:
            self.progress = Progress(
                # Fold, never cut, the run's name when the line is narrow (`size=small,mode=l…`
                # would hide which run this is).
                TextColumn("{task.description}", table_column=Column(overflow="fold", ratio=1)),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.grid_task = self.progress.add_task("[bold]grid[/]", total=total_runs)

    def __enter__(self) -> GridProgress:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.progress is not None:
            if self.run_task is not None:
                self.progress.remove_task(self.run_task)
                self.run_task = None
            self.progress.stop()

    def start_run(self, name: str) -> RunProgress:
        """A callback for the grid point that starts now (replaces the previous run's bar)."""
        if self.progress is None:
            return RunProgress(None, None, name)
        if self.run_task is not None:
            self.progress.remove_task(self.run_task)
        self.run_task = self.progress.add_task(f"[cyan]{plain(name)}[/]", total=None)
        log = None if self.console.is_terminal else self.print
        return RunProgress(self.progress, self.run_task, name, log=log)

    def run_done(self) -> None:
        if self.progress is not None and self.grid_task is not None:
            self.progress.advance(self.grid_task)

    def print(self, message: str, important: bool = False) -> None:
        """A status line above the bars; when quiet only `important` ones (failures) show.

        `message` is rich markup: text from users or libraries in it (run names, errors, paths)
        must be passed through `plain` first."""
        if important or not self.quiet:
            self.console.print(message, highlight=False)
