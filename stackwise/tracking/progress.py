"""Terminal progress of a grid: runs done / total, and the current run's stage, step and loss.

`GridProgress` owns one rich `Progress` with two bars — the grid and the run in flight — and
hands out a `RunProgress` callback per grid point, which the trainer drives. The grid bar moves
by each point's planned compute (`weights`), within a run too, so its ETA is there from the first
steps and long points count as long. With ``quiet`` there are no bars and only important status
lines (failures) are printed; the runner still prints the comparison and the final counts.
Where the output is not a terminal (CI logs, pipes) there are no bars: each finished stage is
reported as a plain line instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
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
        done: Callable[[float], None] | None = None,
    ) -> None:
        self.progress = progress
        self.task = task
        self.name = name
        self.log = log
        self.done = done  # told the fraction of the run's steps done
        self.total_steps = 0
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
        completed = fields.get("completed")
        if completed is not None and self.total_steps:
            fields["runs"] = f"{completed}/{self.total_steps}"  # the steps of this run
        self.progress.update(self.task, description=description, **fields)  # type: ignore[arg-type]

    def on_train_start(self, stages: list[StageInfo]) -> None:
        self.total_steps = sum(s.steps for s in stages)
        self._update(total=self.total_steps)

    def on_stage_start(self, stage: StageInfo, step: int) -> None:
        self.stage = f"stage {stage.index + 1}/{stage.total_stages} {stage.name}"
        self._update(completed=step)

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.loss = metrics.get("train/loss", self.loss)
        self.tokens_per_s = metrics.get("train/tokens_per_s", self.tokens_per_s)
        self._update(completed=step)
        if self.done is not None and self.total_steps:
            self.done(min(1.0, step / self.total_steps))

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
    """Both bars of a `stackwise run`; use as a context manager around the whole grid.

    `weights` (run name -> planned compute, e.g. FLOPs) size each point's share of the grid
    bar; without them every point counts the same. A skipped point leaves the bar's total."""

    def __init__(
        self,
        total_runs: int,
        quiet: bool = False,
        console: Console | None = None,
        weights: Mapping[str, float] | None = None,
    ):
        self.console = console or Console()
        self.quiet = quiet
        self.progress: Progress | None = None
        self.grid_task: TaskID | None = None
        self.run_task: TaskID | None = None
        self.total_runs = total_runs
        self.runs_done = 0
        self.weights = dict(weights or {})
        self._default_weight = (
            sum(self.weights.values()) / len(self.weights) if self.weights else 1.0
        )
        self._current: str | None = None
        self._credited = 0.0  # of the current run's weight, moved on the grid bar already
        self._total = sum(self.weights.values()) if self.weights else float(total_runs)
        if not quiet and self.console.is_terminal:
            self.progress = Progress(
                # Fold, never cut, the run's name when the line is narrow (`size=small,mode=l…`
                # would hide which run this is).
                TextColumn("{task.description}", table_column=Column(overflow="fold", ratio=1)),
                BarColumn(),
                TextColumn("{task.fields[runs]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.grid_task = self.progress.add_task(
                "[bold]grid[/]", total=self._total, runs=self._runs_text()
            )

    def _weight(self, name: str | None) -> float:
        return self.weights.get(name or "", self._default_weight) if self.weights else 1.0

    def _runs_text(self) -> str:
        return f"{self.runs_done}/{self.total_runs}"

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
        self._current, self._credited = name, 0.0
        if self.progress is None:
            log = None if self.quiet or self.console.is_terminal else self.print
            return RunProgress(None, None, name, log=log)
        if self.run_task is not None:
            self.progress.remove_task(self.run_task)
        self.run_task = self.progress.add_task(f"[cyan]{plain(name)}[/]", total=None, runs="")
        return RunProgress(self.progress, self.run_task, name, done=self._run_fraction)

    def _run_fraction(self, fraction: float) -> None:
        """Move the grid bar by the part of the running point's weight done since last time."""
        if self.progress is None or self.grid_task is None:
            return
        target = fraction * self._weight(self._current)
        if target > self._credited:
            self.progress.advance(self.grid_task, target - self._credited)
            self._credited = target

    def run_done(self, name: str | None = None, skipped: bool = False) -> None:
        """Point `name` (default: the one started last) is done; a skipped one leaves the
        total instead of moving the bar, so the ETA counts what is still to train."""
        weight = self._weight(name or self._current)
        credited = self._credited if name in (None, self._current) else 0.0
        self.runs_done += 1
        if self.progress is not None and self.grid_task is not None:
            if skipped:
                self._total = max(0.0, self._total - weight)
                self.progress.update(self.grid_task, total=self._total)
            else:
                self.progress.advance(self.grid_task, weight - credited)
            self.progress.update(self.grid_task, runs=self._runs_text())
        if name in (None, self._current):
            self._current, self._credited = None, 0.0

    def print(self, message: str, important: bool = False) -> None:
        """A status line above the bars; when quiet only `important` ones (failures) show.

        `message` is rich markup: text from users or libraries in it (run names, errors, paths)
        must be passed through `plain` first."""
        if important or not self.quiet:
            self.console.print(message, highlight=False)
