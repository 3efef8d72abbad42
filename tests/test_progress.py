"""The grid's progress: weighted by each point's planned compute, plain lines off a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from stackwise.tracking.progress import GridProgress
from stackwise.training.callbacks import StageInfo, StageResult


def _stage(steps: int) -> StageInfo:
    return StageInfo(
        index=0,
        name="rack",
        kind="rack",
        trainable_blocks=(0, 1),
        steps=steps,
        trainable_parameters=1,
        total_stages=1,
    )


def test_the_grid_bar_moves_by_planned_compute_within_and_between_points() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with GridProgress(3, console=console, weights={"big": 6.0, "small": 2.0, "done": 4.0}) as grid:
        assert grid.progress is not None and grid.grid_task is not None
        task = grid.progress.tasks[0]
        assert task.total == 12.0
        run = grid.start_run("big")
        run.on_train_start([_stage(10)])
        run.on_metrics({"train/loss": 3.0}, 5)  # half of the big point: 3 of its 6
        assert task.completed == 3.0
        grid.run_done("big")
        assert task.completed == 6.0
        # A point found finished leaves the total: what is left to train is the small one.
        grid.run_done("done", skipped=True)
        assert (task.completed, task.total) == (6.0, 8.0)
        grid.start_run("small")
        grid.run_done("small")
        assert (task.completed, task.total) == (8.0, 8.0)
        assert task.fields["runs"] == "3/3"


def test_off_a_terminal_there_are_no_bars_and_each_stage_is_a_line() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    with GridProgress(1, console=console, weights={"a": 1.0}) as grid:
        assert grid.progress is None
        run = grid.start_run("a")
        run.on_train_start([_stage(4)])
        result = StageResult(
            stage=_stage(4),
            steps=4,
            tokens=512,
            train_loss=2.5,
            val_loss=2.75,
            val_perplexity=None,
            wall_time_s=1.0,
            tokens_per_s=100.0,
            peak_memory_bytes=0,
            flops=0.0,
            mfu=None,
        )
        run.on_stage_end(result, 4)
        grid.run_done("a")
    text = out.getvalue()
    assert "a: stage 1/1 rack done at step 4: train loss 2.5000, val loss 2.7500" in text
    assert "━" not in text and "ETA" not in text
