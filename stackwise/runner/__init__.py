"""Running expanded grids: data, rack, trainer and MLflow for every grid point.

`run_experiments` is what `stackwise run` calls once every file has been loaded, validated and
expanded. For each experiment file it opens (or creates) the MLflow experiment of the file's
name, starts one parent run for this invocation, and trains each grid point in a nested child
run::

    experiment "size_vs_mode"
      run "size_vs_mode 2025-01-01 12:00:00"        role=grid  (comparison table + plots)
        run "size=small,mode=layerwise"            role=point (params, metrics, model)
        run "size=small,mode=rackwise"             ...

Identity, skip and resume. A grid point is its run identity (tag ``config_hash``,
`stackwise.identity`): the settings that can change the result, the content of its data files
and the device type it trains on. A point that already has a FINISHED run in the experiment is
skipped (``force`` reruns it). Checkpoints live in ``<store state>/checkpoints/<experiment>/
<identity>/`` (`stackwise.tracking.store.local_root`: each store has its own) and carry the
MLflow run id; an interrupted point resumes from its newest checkpoint into that same run.
Without a checkpoint, a RUNNING or KILLED run of the point whose process is gone is adopted:
training restarts inside it, and the steps it already has are not logged again. So after any
sequence of kills and reruns every point has one run, FINISHED. After a point finishes its
checkpoints are deleted (the model is in MLflow).

Ownership and concurrency. Each point is trained under a file lock (the file names the holder,
``host:pid``, as does the run's ``stackwise.owner`` tag), so two `stackwise run` processes
sharing a store never train the same point at once: a process that finds a point busy moves on
and comes back to it at the end, when it is usually FINISHED and skipped. Locks die with their
process, which is how a RUNNING run whose process was killed is recognised: at the start and
the end of every grid, such point and parent runs are marked KILLED. (For a remote store, a run
owned by another host is left alone: its liveness cannot be seen from here.) SQLite writes
retry while the database is locked (`stackwise.tracking.store.retry_locked`).

Failures and signals. An exception in one point (bad data, a non-finite loss, out of memory)
marks that run FAILED with the error as the ``error`` tag and the traceback as ``error.txt``; the
grid goes on and the summary's exit code is 1. Ctrl-C, SIGTERM and SIGHUP (what `timeout`,
Slurm preemption and `docker stop` send) all stop the same way: the trainer saves a checkpoint,
the point and parent runs are marked KILLED, and `Interrupted` (a KeyboardInterrupt carrying
the signal number, for the exit status 128 + signal) reaches the caller. An executor first ends
the processes of its points; what they left RUNNING under the parent run is then marked KILLED
too (`stackwise.runner.ownership.close_stopped_points`), with a few retries while SQLite is
locked and a line saying what is left for the next run otherwise. A tracking server that
stops answering for longer than ``tracking.server_wait_minutes`` stops it the same way, as
`stackwise.tracking.store.TrackingUnavailable`: the runs are marked KILLED only if the server takes
it at once, and the unsent metrics are kept beside the checkpoint for the rerun.

The package's parts: `grid` (`run_experiments`, a grid's parent run and its points in turn),
`point` (one point: identity, skip, resume or adopt, train, record), `train` (the trainer inside
a point's run), `ownership` (locks, and the runs of dead processes), `summary` (the comparison
table and the summary), `signals` (SIGTERM and SIGHUP as `Interrupted`) and `options` (the
flags, and what the runner and `stackwise.executors` pass each other).
"""

from __future__ import annotations

from stackwise.runner.grid import Grid, run_experiments
from stackwise.runner.options import (
    GridContext,
    Lockstep,
    PointExecutor,
    PointOutcome,
    RunOptions,
)
from stackwise.runner.ownership import TAG_LOCK, TAG_LOST, TAG_OWNER
from stackwise.runner.point import (
    ERROR_TAG_LIMIT,
    FINGERPRINTS_FILE,
    TAG_DATA,
    TAG_DEVICE,
    Point,
    point_of,
    record_failure,
    run_grid_point,
)
from stackwise.runner.signals import (
    STOP_SIGNALS,
    Interrupted,
    signals_as_interrupts,
    signals_deferred,
)
from stackwise.runner.summary import Outcome, RunSummary
from stackwise.runner.train import CHECKPOINT_RUN_ID, CHECKPOINT_TRAINER_HASH

__all__ = [
    "CHECKPOINT_RUN_ID",
    "CHECKPOINT_TRAINER_HASH",
    "ERROR_TAG_LIMIT",
    "FINGERPRINTS_FILE",
    "STOP_SIGNALS",
    "TAG_DATA",
    "TAG_DEVICE",
    "TAG_LOCK",
    "TAG_LOST",
    "TAG_OWNER",
    "Grid",
    "GridContext",
    "Interrupted",
    "Lockstep",
    "Outcome",
    "Point",
    "PointExecutor",
    "PointOutcome",
    "RunOptions",
    "RunSummary",
    "point_of",
    "record_failure",
    "run_experiments",
    "run_grid_point",
    "signals_as_interrupts",
    "signals_deferred",
]
