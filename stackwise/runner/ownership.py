"""Who owns a run: the file locks of grid and point runs, and closing the runs of dead
processes.

Each point is trained under a file lock (`point_lock_path`), and a grid's parent run is alive
while its process holds the lock its ``stackwise.lock`` tag names; both runs name their
holder, ``host:pid``, in the ``stackwise.owner`` tag. Locks die with their process, which is how a
RUNNING run whose process was killed is recognised (`_owner_gone`) and marked KILLED
(`close_abandoned_runs`). A point run an executor's driver marked FAILED because its process
died carries `TAG_LOST`, and is continued like a KILLED one.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from stackwise.tracking.logger import TAG_CONFIG_HASH, TAG_PARENT, TAG_ROLE
from stackwise.tracking.logger import TAG_OWNER as TAG_OWNER  # where the runner names it
from stackwise.tracking.store import (
    INTERRUPTED_ATTEMPTS,
    end_run_or_say_why,
    is_local_store,
    is_lock_error,
    is_locked,
    lock_path,
    owner_alive,
    retry_locked,
)

if TYPE_CHECKING:
    from mlflow.entities import Run

    from stackwise.runner.grid import Grid

TAG_LOCK = "stackwise.lock"  # lock file name held by the process that owns a RUNNING run
# On a point run FAILED because its process died (killed, a lost node; marked by the driver of
# an executor): the point did not fail, so a rerun continues inside that run.
TAG_LOST = "stackwise.process_lost"


def _owner_gone(grid: Grid, run: Run) -> bool:
    """Whether the process that owns RUNNING run `run` is gone (its lock is free).

    Locks of a remote store live on this machine: a run owned by another host is taken to be
    alive, and one of this host counts as alive while its process exists.
    """
    tags = run.data.tags
    if tags.get(TAG_ROLE) == "grid" and TAG_LOCK in tags:
        path = lock_path(grid.uri, tags[TAG_LOCK])
    elif tags.get(TAG_ROLE) == "point" and TAG_CONFIG_HASH in tags:
        path = point_lock_path(grid, tags[TAG_CONFIG_HASH])
    else:
        return False  # not a run StackWise manages
    if is_locked(path):
        return False
    if is_local_store(grid.uri):
        return True
    holder = tags.get(TAG_OWNER)
    return holder is not None and owner_alive(holder) is False


def close_abandoned_runs(grid: Grid) -> None:
    """RUNNING parent and point runs whose process is gone become KILLED (points are then
    adopted by whoever runs them next)."""
    from mlflow.entities import ViewType

    runs = retry_locked(
        lambda: grid.client.search_runs(
            [grid.experiment_id],
            filter_string="attributes.status = 'RUNNING'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
        )
    )
    for run in runs:
        if run.info.run_id != grid.parent_run_id and _owner_gone(grid, run):
            retry_locked(
                functools.partial(grid.client.set_terminated, run.info.run_id, status="KILLED")
            )


def close_stopped_points(grid: Grid) -> list[str]:
    """The point runs of this invocation (nested under its parent run) still RUNNING when its
    grid stops on a signal become KILLED; a line for each the store would not take.

    Called once the processes that ran them have ended (an executor stops its jobs, tasks or
    launches before it lets the interrupt go on): a point cut short outside its training, or
    whose process was killed after its grace, is closed here rather than by the next run.
    """
    from mlflow.entities import ViewType

    try:
        runs = retry_locked(
            lambda: grid.client.search_runs(
                [grid.experiment_id],
                filter_string=(
                    f"tags.`{TAG_PARENT}` = '{grid.parent_run_id}' "
                    "and attributes.status = 'RUNNING'"
                ),
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000,
            ),
            attempts=INTERRUPTED_ATTEMPTS,
        )
    except Exception as error:
        if not is_lock_error(error):
            raise
        return [
            "the point runs of this grid could not be looked up: the tracking store stayed "
            "locked by another process (database is locked); the next run of this grid closes "
            "what is left RUNNING"
        ]
    lines = []
    for run in runs:
        if run.data.tags.get(TAG_ROLE) == "point":
            why = end_run_or_say_why(grid.client, run.info.run_id, "KILLED")
            if why is not None:
                lines.append(why)
    return lines


def point_lock_path(grid: Grid, identity: str) -> Path:
    """The lock file of the point of run identity `identity` in `grid`'s experiment."""
    return lock_path(grid.uri, f"point-{grid.experiment_id}-{identity}")
