"""Running the grids of a `stackwise run`: one parent run per file and store, its points in
turn.

`run_experiments` groups each file's points by the MLflow experiment and store they log to
(`_group_by_store`), and `_run_grid` runs one such group: it closes runs left RUNNING by dead
processes (`stackwise.runner.ownership`), opens the parent run of this invocation under a lock,
runs every point here (`stackwise.runner.point.run_grid_point`; a point another process holds
is waited for at the end) or hands the points to an executor, and ends with the grid's
comparison table (`stackwise.runner.summary`).
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.console import Console

from stackwise.runner.options import GridContext, PointOutcome, RunOptions
from stackwise.runner.ownership import (
    TAG_LOCK,
    TAG_OWNER,
    close_abandoned_runs,
    close_stopped_points,
)
from stackwise.runner.point import finished_grid, run_grid_point, skip_finished
from stackwise.runner.signals import signals_as_interrupts
from stackwise.runner.summary import RunSummary, finish_grid, print_summary
from stackwise.tracking.logger import (
    TAG_FILE,
    TAG_GIT_COMMIT,
    TAG_ROLE,
    TAG_VERSION,
    git_commit,
    run_destination,
)
from stackwise.tracking.progress import GridProgress, plain
from stackwise.tracking.store import (
    FileLock,
    TrackingUnavailable,
    end_run_if_reachable,
    end_run_or_say_why,
    get_or_create_experiment,
    lock_path,
    open_client,
    owner,
    prepare_store,
    release_interrupted_calls,
    retry_locked,
    server_gone,
    unreachable_reason,
)
from stackwise.training.memory import planned_compute

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from stackwise.config.experiment import Experiment, RunSpec


@dataclass
class Grid:
    """One experiment file's grid being run against one store: its MLflow experiment, the
    parent run of this invocation and the runs of its points so far. `run_experiments` opens
    one per file and store; a process that runs points of a grid another process opened
    (`stackwise.executors`) joins it with `Grid.joined`."""

    experiment: Experiment | None  # None in a process running points of another's grid
    name: str
    uri: str
    specs: list[RunSpec]
    client: MlflowClient
    experiment_id: str
    parent_run_id: str = ""
    point_run_ids: dict[str, str] = field(default_factory=dict)  # run name -> run id
    failures: int = 0

    @classmethod
    def joined(cls, context: GridContext, specs: Sequence[RunSpec]) -> Grid:
        """The grid `context` names, seen from a process that runs `specs` of it: the same
        store, experiment and parent run; no experiment file (the driver has it)."""
        return cls(
            None,
            context.name,
            context.uri,
            list(specs),
            open_client(context.uri),
            context.experiment_id,
            parent_run_id=context.parent_run_id,
        )


def run_experiments(
    plans: Sequence[tuple[Experiment, Sequence[RunSpec]]],
    options: RunOptions,
    console: Console | None = None,
) -> RunSummary:
    """Train and track every grid point of every plan; see `stackwise.runner`.

    SIGTERM and SIGHUP stop it like Ctrl-C: `Interrupted` (a KeyboardInterrupt) is raised.
    """
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: room for the comparison table
            console = Console(width=max(console.width, 160))
    with signals_as_interrupts():
        if options.threads is not None:
            import torch

            torch.set_num_threads(options.threads)
        summary = RunSummary()
        total = sum(len(specs) for _, specs in plans)
        weights = {spec.name: planned_compute(spec.config) for _, specs in plans for spec in specs}
        with GridProgress(total, options.quiet, console, weights) as progress:
            for experiment, specs in plans:
                for name, uri, group in _group_by_store(specs, options.tracking_uri):
                    try:
                        _run_grid(experiment, name, uri, group, options, progress, summary)
                    except Exception as error:  # opening the grid: nothing to mark
                        if unreachable_reason(error) is None:
                            raise
                        raise server_gone(uri, error) from error
        print_summary(summary, console)
    return summary


def _group_by_store(
    specs: Sequence[RunSpec], cli_uri: str | None
) -> list[tuple[str, str, list[RunSpec]]]:
    """Grid points by (MLflow experiment, store): a file normally maps to exactly one."""
    groups: dict[tuple[str, str], list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(run_destination(spec, cli_uri), []).append(spec)
    return [(name, uri, group) for (name, uri), group in groups.items()]


@functools.lru_cache(maxsize=4)
def _commit() -> str | None:
    return git_commit()


def _run_grid(
    experiment: Experiment,
    name: str,
    uri: str,
    specs: list[RunSpec],
    options: RunOptions,
    progress: GridProgress,
    summary: RunSummary,
) -> None:
    from stackwise._version import __version__

    prepare_store(uri)
    client = open_client(uri)
    experiment_id = get_or_create_experiment(client, uri, name)
    grid = Grid(experiment, name, uri, specs, client, experiment_id)
    close_abandoned_runs(grid)
    done = None if options.force else finished_grid(grid)
    if done is not None:  # a rerun of a finished grid: no parent run with nothing under it
        progress.print(
            f"[bold]{plain(name)}[/]: all {len(specs)} run(s) already FINISHED in "
            f"{plain(uri)}; nothing to train"
        )
        for spec in specs:
            skip_finished(grid, spec, done[spec.name], progress, summary)
            progress.run_done(spec.name, skipped=True)
        finish_grid(grid, progress)
        return

    # The parent run is "alive" while this process holds its lock (see close_abandoned_runs).
    parent_lock_name = f"grid-{uuid.uuid4().hex}"
    parent_lock = FileLock(lock_path(uri, parent_lock_name))
    parent_lock.acquire()
    tags = {
        TAG_ROLE: "grid",
        TAG_VERSION: __version__,
        TAG_FILE: str(experiment.path),
        TAG_LOCK: parent_lock_name,
        TAG_OWNER: owner(),
        "grid.points": str(len(specs)),
        "mlflow.source.name": "stackwise run",
    }
    commit = _commit()
    if commit is not None:
        tags[TAG_GIT_COMMIT] = commit
    try:
        parent = retry_locked(
            lambda: client.create_run(
                experiment_id, run_name=f"{name} {time.strftime('%Y-%m-%d %H:%M:%S')}", tags=tags
            )
        )
    except BaseException:
        parent_lock.release()
        raise
    grid.parent_run_id = parent.info.run_id
    summary.parent_run_ids[name] = grid.parent_run_id

    status = "FINISHED"
    gone = False  # the tracking server stopped answering: end the parent run only if it can
    try:
        progress.print(
            f"[bold]{plain(name)}[/]: {len(specs)} run(s) → {plain(uri)} "
            f"(parent run {grid.parent_run_id})"
        )
        if experiment.path.is_file():
            retry_locked(lambda: client.log_artifact(grid.parent_run_id, str(experiment.path)))
        if options.executor is not None:
            context = GridContext(name, uri, experiment_id, grid.parent_run_id)
            points = options.executor.run_points(context, specs, options, progress)
            try:
                for spec, outcome in points:
                    _record_outcome(grid, spec, outcome, summary)
                    progress.run_done(spec.name, skipped=outcome.status == "skipped")
            finally:
                # A signal here, between two outcomes, reaches the executor as it is closed: it
                # stops the points it still runs before the grid's runs are closed below.
                close = getattr(points, "close", None)
                if close is not None:
                    close()
        else:
            deferred = []
            for spec in specs:
                if not run_grid_point(grid, spec, options, progress, summary, wait=False):
                    deferred.append(spec)
            for spec in deferred:  # busy in another process: wait for it, then skip or run
                progress.print(f"  {plain(spec.name)}: running in another process, waiting for it")
                run_grid_point(grid, spec, options, progress, summary, wait=True)
        finish_grid(grid, progress)
        # A process sharing the store may have died meanwhile: close what it left RUNNING.
        close_abandoned_runs(grid)
        if grid.failures:
            status = "FAILED"
    except KeyboardInterrupt as stop:
        status = "KILLED"
        gone = isinstance(stop, TrackingUnavailable)
        if not gone:
            # A store call the signal cut short may hold the lock (`release_interrupted_calls`);
            # the executor has ended its points' processes: close what they left RUNNING.
            release_interrupted_calls(stop)
            for line in close_stopped_points(grid):
                progress.print(f"  [yellow]{plain(line)}[/]", important=True)
        raise
    except Exception as error:  # e.g. a torchrun launch that cannot go on after a failed point
        if unreachable_reason(error) is not None:
            status, gone = "KILLED", True
            raise server_gone(uri, error) from error
        status = "FAILED"
        raise
    finally:
        try:
            if gone:
                end_run_if_reachable(client, uri, grid.parent_run_id, status)
            elif status == "KILLED":  # stopped by a signal: a locked store does not stop the stop
                why = end_run_or_say_why(client, grid.parent_run_id, status)
                if why is not None:
                    progress.print(f"  [yellow]{plain(why)}[/]", important=True)
            else:
                retry_locked(lambda: client.set_terminated(grid.parent_run_id, status=status))
        finally:
            parent_lock.release()


def _record_outcome(grid: Grid, spec: RunSpec, outcome: PointOutcome, summary: RunSummary) -> None:
    """Add the outcome of a point run by an executor to the grid and the summary."""
    if outcome.run_id is not None:
        grid.point_run_ids[spec.name] = outcome.run_id
        summary.run_ids[(grid.name, spec.name)] = outcome.run_id
    entry = (grid.name, spec.name, outcome.message)
    if outcome.status == "finished":
        summary.finished.append(entry)
    elif outcome.status == "skipped":
        summary.skipped.append(entry)
    else:
        grid.failures += 1
        summary.failed.append(entry)
