"""Where the points of a grid train: here, in parallel jobs, on a Ray cluster, under torchrun.

`stackwise.runner` opens a grid the same way whatever the executor; an executor only decides
where each point trains. The steps:

1. The driver (`stackwise run`) validates every file and grid, opens the MLflow experiment and
   the grid's parent run, and hands the points to an executor with a `GridContext` (store,
   experiment, parent run).
2. The executor runs every point with `run_point` in a process of its choosing: a subprocess per
   point for ``--jobs N`` (`stackwise.executors.local`), a Ray task per point for
   ``--executor ray`` (`stackwise.executors.ray`), a ``torchrun`` launch of N processes per point
   for ``--nproc N`` (`stackwise.executors.torchrun`).
3. `run_point` is the local runner's own point: it looks the point up by its identity, skips it
   when FINISHED, resumes or adopts an interrupted run, trains under the point's lock and logs
   the child run into the same store, nested under the driver's parent run. So skip, resume,
   ownership and failure handling are exactly those of a local `stackwise run`.
4. Each point's `PointOutcome` goes back to the driver, which counts it (`PointBoard`: done,
   running, failed) and builds the grid's comparison at the end. A point whose process died
   without an outcome (killed, lost node) is marked FAILED with the error by `mark_lost_point`
   (a rerun continues inside that run); the other points go on, and the exit status is 1.
   A signal to the driver reaches every point in flight; the driver waits for their processes
   to end (killing those that outlive a grace) before the runner marks the grid KILLED.
5. A point that another process holds comes back ``busy`` and is run again at the end, waiting
   for its lock (as the local runner does).

The package's parts: `point` (one point in whatever process runs it), `messages` (what
travels between processes), `common` (the board of points, the error for the user), `choice`
(which executor `stackwise run`'s flags ask for), and one module per executor: `local`, `ray`,
`torchrun` (with `worker`, the process a ``--jobs`` or torchrun launch starts).
"""

from __future__ import annotations

from stackwise.executors.choice import (
    EXECUTORS,
    choose_executor,
    distributed_problems,
    under_torchrun,
)
from stackwise.executors.common import ExecutorError, PointBoard, available_cpus
from stackwise.executors.point import mark_lost_point, run_point

__all__ = [
    "EXECUTORS",
    "ExecutorError",
    "PointBoard",
    "available_cpus",
    "choose_executor",
    "distributed_problems",
    "mark_lost_point",
    "run_point",
    "under_torchrun",
]
