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
the signal number, for the exit status 128 + signal) reaches the caller.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console

from stackwise.tracking.logger import (
    TAG_CONFIG_HASH,
    TAG_ERROR,
    TAG_FILE,
    TAG_GIT_COMMIT,
    TAG_PARENT,
    TAG_ROLE,
    TAG_VERSION,
    MlflowLogger,
    git_commit,
    log_params,
    logged_steps,
    run_destination,
    run_params,
    run_tags,
    set_tags,
)
from stackwise.tracking.progress import GridProgress, plain
from stackwise.tracking.store import (
    FileLock,
    checkpoint_dir,
    get_or_create_experiment,
    is_local_store,
    is_locked,
    local_root,
    lock_path,
    open_client,
    owner,
    owner_alive,
    prepare_store,
    retry_locked,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from stackwise.config.base import StackWiseConfig
    from stackwise.config.experiment import Experiment, RunSpec

TAG_LOCK = "stackwise.lock"  # lock file name held by the process that owns a RUNNING run
TAG_OWNER = "stackwise.owner"  # host:pid of the process that runs (or last ran) it
TAG_DEVICE = "stackwise.device"  # device type the point trains on (part of its identity)
TAG_DATA = "stackwise.data_fingerprint"  # sha256 of the data's content (part of its identity)
CHECKPOINT_RUN_ID = "mlflow_run_id"
CHECKPOINT_TRAINER_HASH = "trainer_config_hash"  # the trainer's own check on resume
FINGERPRINTS_FILE = "data-fingerprints.json"
ERROR_TAG_LIMIT = 5000


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt so every
    layer does what it does for Ctrl-C (checkpoint, KILLED runs); `signum` gives the exit
    status (128 + signum: 143 for SIGTERM, 129 for SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Interrupted` (once: further ones are ignored
    while the run shuts down, so its checkpoint is not cut short). A signal the process was
    started with ignored (``nohup``) stays ignored. Only the main thread can install handlers;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    previous = {}
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class RunOptions:
    """How `run_experiments` behaves (the CLI's `run` flags)."""

    tracking_uri: str | None = None
    force: bool = False
    quiet: bool = False
    threads: int | None = None  # torch intra-op CPU threads; None keeps torch's default
    # Where grid points train (`stackwise.executors`: --jobs, Ray, torchrun); None: here, one
    # after another.
    executor: PointExecutor | None = None
    # Under torchrun, rank 0's hooks that start each point's training on the other ranks too.
    lockstep: Lockstep | None = None


@dataclass(frozen=True)
class GridContext:
    """What another process needs to run points of a grid this one opened (picklable)."""

    name: str  # MLflow experiment name
    uri: str
    experiment_id: str
    parent_run_id: str


@dataclass(frozen=True)
class PointOutcome:
    """What happened to one grid point run elsewhere: ``finished``, ``skipped``, ``failed``, or
    ``busy`` (another process holds the point: run it again, waiting for its lock)."""

    status: str
    message: str = ""
    run_id: str | None = None


class PointExecutor(Protocol):
    """Runs the points of one grid (each as `stackwise.executors.run_point` does) and yields
    every point's outcome as it completes."""

    def run_points(
        self,
        context: GridContext,
        specs: Sequence[RunSpec],
        options: RunOptions,
        progress: GridProgress,
    ) -> Iterator[tuple[RunSpec, PointOutcome]]: ...


class Lockstep(Protocol):
    """Rank 0's side of a run trained by every rank of a torchrun launch."""

    world: int

    def begin(self, point: Point, folder: Path) -> None:
        """The point's trainer starts now (after its checkpoint folder is settled)."""

    def failed(self, message: str) -> None:
        """The point's training failed on rank 0 (recorded FAILED): the other ranks cannot
        follow any further."""


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


@dataclass(frozen=True)
class Point:
    """A grid point as it is run: its config with `data.paths` resolved, and its identity."""

    spec: RunSpec
    config: StackWiseConfig
    identity: str
    device_type: str
    data_fingerprint: str


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
    """Train and track every grid point of every plan; see the module docstring.

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
        with GridProgress(total, quiet=options.quiet, console=console) as progress:
            for experiment, specs in plans:
                for name, uri, group in _group_by_store(specs, options.tracking_uri):
                    _run_grid(experiment, name, uri, group, options, progress, summary)
        _print_summary(summary, console)
    return summary


def point_of(spec: RunSpec, uri: str) -> Point:
    """Resolve a grid point against this machine: data paths (against the experiment file's
    folder), the data's fingerprint (cached in the store's folder) and the device type."""
    from stackwise.identity import (
        FingerprintCache,
        data_fingerprint,
        resolve_data_paths,
        run_identity,
    )
    from stackwise.training.device import resolve_device

    config = resolve_data_paths(spec.config, Path(spec.file).resolve().parent)
    fingerprint = data_fingerprint(
        config.data, FingerprintCache(local_root(uri) / FINGERPRINTS_FILE)
    )
    device_type = resolve_device(config.training.device).type
    identity = run_identity(config, device_type, fingerprint)
    return Point(spec, config, identity, device_type, fingerprint)


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
    _close_abandoned_runs(grid)

    # The parent run is "alive" while this process holds its lock (see _close_abandoned_runs).
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
    try:
        progress.print(
            f"[bold]{plain(name)}[/]: {len(specs)} run(s) → {plain(uri)} "
            f"(parent run {grid.parent_run_id})"
        )
        if experiment.path.is_file():
            retry_locked(lambda: client.log_artifact(grid.parent_run_id, str(experiment.path)))
        if options.executor is not None:
            context = GridContext(name, uri, experiment_id, grid.parent_run_id)
            for spec, outcome in options.executor.run_points(context, specs, options, progress):
                _record_outcome(grid, spec, outcome, summary)
                progress.run_done()
        else:
            deferred = []
            for spec in specs:
                if not run_grid_point(grid, spec, options, progress, summary, wait=False):
                    deferred.append(spec)
            for spec in deferred:  # busy in another process: wait for it, then skip or run
                progress.print(f"  {plain(spec.name)}: running in another process, waiting for it")
                run_grid_point(grid, spec, options, progress, summary, wait=True)
        _finish_grid(grid, progress)
        # A process sharing the store may have died meanwhile: close what it left RUNNING.
        _close_abandoned_runs(grid)
        if grid.failures:
            status = "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception:  # e.g. a torchrun launch that cannot go on after a failed point
        status = "FAILED"
        raise
    finally:
        retry_locked(lambda: client.set_terminated(grid.parent_run_id, status=status))
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


def _owner_gone(grid: Grid, run: Run) -> bool:
    """Whether the process that owns RUNNING run `run` is gone (its lock is free).

    Locks of a remote store live on this machine: a run owned by another host is taken to be
    alive, and one of this host counts as alive while its process exists.
    """
    tags = run.data.tags
    if tags.get(TAG_ROLE) == "grid" and TAG_LOCK in tags:
        path = lock_path(grid.uri, tags[TAG_LOCK])
    elif tags.get(TAG_ROLE) == "point" and TAG_CONFIG_HASH in tags:
        path = _point_lock_path(grid, tags[TAG_CONFIG_HASH])
    else:
        return False  # not a run StackWise manages
    if is_locked(path):
        return False
    if is_local_store(grid.uri):
        return True
    holder = tags.get(TAG_OWNER)
    return holder is not None and owner_alive(holder) is False


def _close_abandoned_runs(grid: Grid) -> None:
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


def _point_lock_path(grid: Grid, identity: str) -> Path:
    return lock_path(grid.uri, f"point-{grid.experiment_id}-{identity}")


def _finished_run(grid: Grid, identity: str) -> Run | None:
    from mlflow.entities import ViewType

    runs = retry_locked(
        lambda: grid.client.search_runs(
            [grid.experiment_id],
            filter_string=(
                f"tags.`{TAG_CONFIG_HASH}` = '{identity}' and attributes.status = 'FINISHED'"
            ),
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1,
            order_by=["attributes.end_time DESC"],
        )
    )
    return runs[0] if runs else None


def run_grid_point(
    grid: Grid,
    spec: RunSpec,
    options: RunOptions,
    progress: GridProgress,
    summary: RunSummary,
    wait: bool,
) -> bool:
    """Skip, resume or train one point of `grid` in this process, under the point's lock, and
    add its outcome to `summary` (and to `grid`'s runs and failures). Returns False when another
    process holds the point and `wait` is off (nothing is recorded then); with `wait` it waits
    for the lock and then skips or trains the point."""
    try:
        point = point_of(spec, grid.uri)
    except (OSError, ValueError, RuntimeError) as error:  # data gone or unreadable since checks
        progress.run_done()
        message = f"{type(error).__name__}: {error}"
        grid.failures += 1
        summary.failed.append((grid.name, spec.name, message))
        progress.print(f"  [red]✗ {plain(spec.name)}: FAILED — {plain(message)}[/]", important=True)
        return True
    lock = FileLock(_point_lock_path(grid, point.identity))
    if not lock.acquire(blocking=wait):
        return False
    try:
        finished = _finished_run(grid, point.identity)
        if finished is not None and not options.force:
            # A process killed between finishing and cleaning up leaves its checkpoints.
            shutil.rmtree(checkpoint_dir(grid.uri, grid.name, point.identity), ignore_errors=True)
            grid.point_run_ids[spec.name] = finished.info.run_id
            summary.run_ids[(grid.name, spec.name)] = finished.info.run_id
            message = f"already FINISHED (run {finished.info.run_id})"
            summary.skipped.append((grid.name, spec.name, message))
            progress.print(f"  [dim]↷ {plain(spec.name)}: {plain(message)}[/]")
            return True
        _train_point(grid, point, options, progress, summary)
        return True
    finally:
        progress.run_done()
        lock.release()


def _adoptable_run(grid: Grid, point: Point, folder: Path, force: bool) -> tuple[str | None, bool]:
    """The run to continue, under the point's lock: (run id or None, whether a checkpoint of it
    is there to resume from).

    First the run named by the newest checkpoint; else the newest RUNNING or KILLED run of this
    identity (its process is gone: we hold the lock), restarted from scratch. `force` starts a
    new run.
    """
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    from stackwise.training.checkpoint import read_checkpoint_metadata

    if force:
        shutil.rmtree(folder, ignore_errors=True)
        return None, False
    metadata = read_checkpoint_metadata(folder) if folder.exists() else None
    run_id = (metadata or {}).get(CHECKPOINT_RUN_ID)
    if run_id:
        try:
            run = retry_locked(lambda: grid.client.get_run(run_id))
        except MlflowException:
            run = None
        if (
            run is not None
            and run.info.lifecycle_stage == "active"
            and run.info.status != "FINISHED"
            and run.info.experiment_id == grid.experiment_id
        ):
            return run_id, True
    # A checkpoint without a live run (deleted in the UI, another store) cannot be resumed into.
    shutil.rmtree(folder, ignore_errors=True)
    candidates = retry_locked(
        lambda: grid.client.search_runs(
            [grid.experiment_id],
            filter_string=(
                f"tags.`{TAG_CONFIG_HASH}` = '{point.identity}' and tags.`{TAG_ROLE}` = 'point'"
            ),
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=100,
            order_by=["attributes.start_time DESC"],
        )
    )
    for run in candidates:
        if run.info.status not in ("RUNNING", "KILLED"):
            continue  # FINISHED (force) and FAILED runs stay as they are
        holder = run.data.tags.get(TAG_OWNER)
        if (
            run.info.status == "RUNNING"
            and not is_local_store(grid.uri)
            and holder is not None
            and holder != owner()
            and owner_alive(holder) is not False
        ):
            continue  # a remote store's run of another live process (or host): not ours
        return run.info.run_id, False
    return None, False


def _train_point(
    grid: Grid,
    point: Point,
    options: RunOptions,
    progress: GridProgress,
    summary: RunSummary,
) -> None:
    client, spec = grid.client, point.spec
    folder = checkpoint_dir(grid.uri, grid.name, point.identity)
    run_id, has_checkpoint = _adoptable_run(grid, point, folder, options.force)
    adopted = run_id is not None
    params = run_params(point.config, spec.coordinates)
    if point.config.model.vocab_size is None:  # known once the tokenizer exists (`_train`)
        params.pop("model.vocab_size", None)
    if run_id is None:
        tags = run_tags(
            point.config,
            spec.coordinates,
            point.identity,
            spec.name,
            spec.file,
            tuned=spec.tuned,
            seed=spec.seed,
            point=spec.point or spec.name,
        )
        tags.update(_point_tags(grid, point))
        tags["mlflow.source.name"] = "stackwise run"
        run = retry_locked(
            lambda: client.create_run(grid.experiment_id, run_name=spec.name, tags=tags)
        )
        run_id = run.info.run_id
        log_params(client, run_id, params)
    else:
        adopted_id = run_id
        retry_locked(lambda: client.update_run(adopted_id, status="RUNNING"))
        # Re-parent under this invocation, so its parent run lists the whole grid; own it.
        set_tags(client, run_id, {**_point_tags(grid, point), "resumed": "true"})
        # A process killed while logging params left some out; MLflow refuses to change the
        # others (they may differ in settings outside the identity, e.g. log cadence).
        have = retry_locked(lambda: client.get_run(adopted_id)).data.params
        log_params(client, run_id, {k: v for k, v in params.items() if k not in have})
    new_id = run_id
    retry_locked(lambda: client.log_text(new_id, point.config.to_yaml(), "config.yaml"))
    grid.point_run_ids[spec.name] = run_id
    summary.run_ids[(grid.name, spec.name)] = run_id

    if has_checkpoint:
        verb = "resuming"
    elif adopted:
        verb = "restarting (no checkpoint)"
    else:
        verb = "training"
    progress.print(f"  ▶ {plain(spec.name)}: {verb} (run {run_id})")
    started = time.perf_counter()
    logger: MlflowLogger | None = None
    monitor: Any = None
    try:
        logger, monitor, final = _train(
            grid, point, run_id, folder, progress, adopted, lockstep=options.lockstep
        )
        logger.close()
        if monitor is not None:
            monitor.finish()
            monitor = None
        retry_locked(lambda: client.set_terminated(new_id, status="FINISHED"))
        shutil.rmtree(folder, ignore_errors=True)
    except KeyboardInterrupt:
        _close_quietly(logger, monitor)
        retry_locked(lambda: client.set_terminated(new_id, status="KILLED"))
        raise
    except Exception as error:
        _close_quietly(logger, monitor)
        message = f"{type(error).__name__}: {error}"
        record_failure(client, run_id, message, traceback.format_exc())
        grid.failures += 1
        summary.failed.append((grid.name, spec.name, message))
        progress.print(f"  [red]✗ {plain(spec.name)}: FAILED — {plain(message)}[/]", important=True)
        if options.lockstep is not None:
            options.lockstep.failed(message)
        return
    elapsed = time.perf_counter() - started
    loss = final.get("final_val_loss")
    shown = f"val loss {loss:.4f}" if loss is not None else "no validation loss"
    summary.finished.append((grid.name, spec.name, f"{shown}, {elapsed:.1f} s"))
    progress.print(f"  [green]✓ {plain(spec.name)}[/]: {shown} ({elapsed:.1f} s)")


def _point_tags(grid: Grid, point: Point) -> dict[str, str]:
    return {
        TAG_PARENT: grid.parent_run_id,
        TAG_OWNER: owner(),
        TAG_DEVICE: point.device_type,
        TAG_DATA: point.data_fingerprint,
    }


def _train(
    grid: Grid,
    point: Point,
    run_id: str,
    folder: Path,
    progress: GridProgress,
    adopted: bool = False,
    lockstep: Lockstep | None = None,
) -> tuple[MlflowLogger, Any, dict[str, float]]:
    """Build data and rack, train with logging, log the model. Returns what must be closed."""
    from stackwise.api import load_data, train
    from stackwise.tracking.models import log_rack
    from stackwise.training.checkpoint import read_checkpoint_metadata

    config, data = load_data(point.config)
    if point.config.model.vocab_size is None:
        # The same value again on resume, which MLflow accepts.
        log_params(grid.client, run_id, {"model.vocab_size": str(config.model.vocab_size)})
    # The trainer resumes only a checkpoint of exactly its config; one written under settings
    # outside the identity (a device name, a data path of the same content) is started over.
    trainer_hash = config.config_hash()
    if lockstep is not None and lockstep.world > 1:  # resumes with the same number of processes
        trainer_hash = f"{trainer_hash}-world{lockstep.world}"
    metadata = read_checkpoint_metadata(folder) if folder.exists() else None
    if metadata is not None and metadata.get(CHECKPOINT_TRAINER_HASH, trainer_hash) != trainer_hash:
        shutil.rmtree(folder, ignore_errors=True)
        progress.print(
            f"    {plain(point.spec.name)}: its checkpoint was written under other settings outside the "
            f"run identity (a device name, a data path, the number of processes); starting over "
            f"inside run {run_id}"
        )
    training = config.training
    logger = MlflowLogger(
        grid.client,
        run_id,
        tokens_per_step=training.batch_size * training.grad_accum_steps * training.seq_len,
        # Steps an adopted run already has (before its checkpoint, or before it was killed
        # without one) are replayed exactly; record them only once.
        already_logged=logged_steps(grid.client, run_id) if adopted else None,
    )
    monitor = None
    if config.tracking.system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=5, resume_logging=True, tracking_uri=grid.uri
        )
        monitor.start()
    try:
        if lockstep is not None:  # torchrun: the other ranks start the same training now
            lockstep.begin(point, folder)
        trained = train(
            config,
            data=data,
            callbacks=[logger, progress.start_run(point.spec.name)],
            checkpoint_dir=folder,
            resume=True,
            checkpoint_metadata={
                CHECKPOINT_RUN_ID: run_id,
                TAG_CONFIG_HASH: point.identity,
                CHECKPOINT_TRAINER_HASH: trainer_hash,
            },
        )
        rack, results = trained.rack, trained.results
        extra = {
            "parameters": float(rack.get_parameter_count()),
            "train_corpus_tokens": float(data.train_tokens),
            "val_corpus_tokens": float(data.val_tokens),
            "test_corpus_tokens": float(data.test_tokens),
            # passes over the training data a run's tokens amount to (repeats past ~4 lose value)
            "epochs": results.total_tokens / max(data.train_tokens, 1),
        }
        logger.log_metrics(extra, results.total_steps)
        logger.writer.flush()
        if config.tracking.log_model:
            tokenizer_json = getattr(data.tokenizer, "to_json", None)
            log_rack(
                rack,
                run_id,
                grid.experiment_id,
                grid.uri,
                tokenizer_json=tokenizer_json() if callable(tokenizer_json) else None,
                weights_dir=results.weights_dir,
            )
    except BaseException:
        # The caller closes these on success; on failure it only knows them through us.
        _close_quietly(logger, monitor)
        raise
    return logger, monitor, results.summary_metrics()


def _close_quietly(logger: MlflowLogger | None, monitor: Any) -> None:
    """Flush what can be flushed while handling another error (that error is what matters)."""
    if monitor is not None:
        with contextlib.suppress(Exception):
            monitor.finish()
    if logger is not None:
        with contextlib.suppress(Exception):
            logger.close()


def record_failure(client: MlflowClient, run_id: str, message: str, trace: str) -> None:
    """Mark run `run_id` FAILED: `message` as its ``error`` tag (cut to `ERROR_TAG_LIMIT`
    characters) and `trace` as its ``error.txt`` artifact. The run is FAILED even when the tag
    or the artifact cannot be written."""
    short = message if len(message) <= ERROR_TAG_LIMIT else message[: ERROR_TAG_LIMIT - 3] + "..."
    try:
        set_tags(client, run_id, {TAG_ERROR: short})
        retry_locked(lambda: client.log_text(run_id, trace, "error.txt"))
    finally:
        retry_locked(lambda: client.set_terminated(run_id, status="FAILED"))


def _finish_grid(grid: Grid, progress: GridProgress) -> None:
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


def _print_summary(summary: RunSummary, console: Console) -> None:
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
