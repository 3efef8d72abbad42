"""One grid point, in whatever process runs it (a ``--jobs`` subprocess, a Ray task, rank 0 of
a torchrun launch), and a point whose process died.

`run_point` runs the point exactly as `stackwise run` does here (`stackwise.runner.run_grid_point`
in the grid `Grid.joined` rebuilds from the driver's `GridContext`): skip, resume, adopt, train
under the point's lock, record the child run under the driver's parent run. `mark_lost_point`
is the driver's side when a point's process died without an outcome.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from stackwise.config.experiment import RunSpec
    from stackwise.runner import GridContext, PointOutcome, RunOptions


def run_point(
    context: GridContext,
    spec: RunSpec,
    options: RunOptions,
    wait: bool = True,
    console: Console | None = None,
) -> PointOutcome:
    """Run one point of the grid `context` names, exactly as the local runner does (skip,
    resume, adopt, train, record); `wait`: wait for a point another process holds, else come
    back ``busy``. SIGTERM and SIGHUP stop it like Ctrl-C (`stackwise.runner.Interrupted`)."""
    from stackwise.runner import (
        Grid,
        PointOutcome,
        RunSummary,
        run_grid_point,
        signals_as_interrupts,
    )
    from stackwise.tracking.progress import GridProgress

    with signals_as_interrupts():
        if options.threads is not None:
            import torch

            torch.set_num_threads(options.threads)
        grid = Grid.joined(context, [spec])
        summary = RunSummary()
        with GridProgress(1, quiet=options.quiet, console=console) as progress:
            if not run_grid_point(grid, spec, options, progress, summary, wait=wait):
                return PointOutcome("busy")
    run_id = summary.run_ids.get((context.name, spec.name))
    for status, outcomes in (
        ("finished", summary.finished),
        ("skipped", summary.skipped),
        ("failed", summary.failed),
    ):
        if outcomes:
            return PointOutcome(status, outcomes[0][2], run_id)
    raise RuntimeError(f"point {spec.name} ended without an outcome")  # pragma: no cover


def mark_lost_point(context: GridContext, spec: RunSpec, message: str) -> PointOutcome:
    """A point whose process died without an outcome: its run of this grid (RUNNING, or KILLED
    by a signal) becomes FAILED with `message` as its error, tagged `TAG_LOST` so that a rerun
    continues inside it (from its checkpoint, or from the start when it has none) as it would
    a KILLED run; a point that died before its run existed is only reported."""
    from mlflow.entities import ViewType

    from stackwise.runner import TAG_LOST, PointOutcome, record_failure
    from stackwise.tracking.logger import TAG_PARENT, TAG_RUN_NAME, set_tags
    from stackwise.tracking.store import open_client, retry_locked

    client = open_client(context.uri)
    runs = retry_locked(
        lambda: client.search_runs(
            [context.experiment_id],
            filter_string=(
                f"tags.`{TAG_PARENT}` = '{context.parent_run_id}' "
                f"and tags.`{TAG_RUN_NAME}` = '{_quoted(spec.name)}'"
            ),
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=10,
            order_by=["attributes.start_time DESC"],
        )
    )
    for run in runs:
        if run.info.status in ("RUNNING", "KILLED"):
            set_tags(client, run.info.run_id, {TAG_LOST: "true"})
            record_failure(client, run.info.run_id, message, message + "\n")
            return PointOutcome("failed", message, run.info.run_id)
        if run.info.status == "FAILED":  # recorded by the point itself before its process died
            error = run.data.tags.get("error", message)
            return PointOutcome("failed", error, run.info.run_id)
    return PointOutcome("failed", message)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")
