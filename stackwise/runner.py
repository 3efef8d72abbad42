"""Running expanded grids: data, rack, trainer and MLflow for every grid point.

`run_experiments` is what `stackwise run` calls once every file has been loaded, validated and
expanded. For each experiment file it opens (or creates) the MLflow experiment of the file's
name, starts one parent run for this invocation, and trains each grid point in a nested child
run::

    experiment "size_vs_mode"
      run "size_vs_mode 2025-01-01 12:00:00"        role=grid  (comparison table + plots)
        run "size=small,mode=layerwise"            role=point (params, metrics, model)
        run "size=small,mode=rackwise"             ...

Identity, skip and resume. A grid point is its config hash (tag ``config_hash``). A point that
already has a FINISHED run in the experiment is skipped (``force`` reruns it). Checkpoints live in
``<store>/checkpoints/<experiment>/<config hash>/`` and carry the MLflow run id; an interrupted
point (killed, crashed, or failed after a checkpoint) resumes from its newest checkpoint into that
same run. After a point finishes its checkpoints are deleted (the model is in MLflow).

Concurrency. Each point is trained under a file lock, so two `stackwise run` processes sharing a
store never train the same point at once: a process that finds a point busy moves on and comes
back to it at the end, when it is usually FINISHED and skipped. Locks die with their process,
which is also how a RUNNING run whose process was killed is recognised (and marked KILLED).
SQLite writes retry while the database is locked (`stackwise.tracking.store.retry_locked`).

Failures. An exception in one point (bad data, a non-finite loss, out of memory) marks that run
FAILED with the error as the ``error`` tag and the traceback as ``error.txt``; the grid goes on and
the summary's exit code is 1. Ctrl-C marks the current runs KILLED (the trainer has saved a
checkpoint) and stops.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    run_params,
    run_tags,
    set_tags,
)
from stackwise.tracking.progress import GridProgress
from stackwise.tracking.store import (
    FileLock,
    checkpoint_dir,
    get_or_create_experiment,
    is_local_store,
    is_locked,
    lock_path,
    open_client,
    prepare_store,
    resolve_tracking_uri,
    retry_locked,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from stackwise.config.experiment import Experiment, RunSpec

TAG_LOCK = "stackwise.lock"  # lock file name held by the process that owns a RUNNING run
CHECKPOINT_RUN_ID = "mlflow_run_id"
ERROR_TAG_LIMIT = 5000


@dataclass
class RunOptions:
    """How `run_experiments` behaves (the CLI's `run` flags)."""

    tracking_uri: str | None = None
    force: bool = False
    quiet: bool = False
    threads: int | None = None  # torch intra-op CPU threads; None keeps torch's default


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


@dataclass
class _Grid:
    """One experiment file's grid being run against one store."""

    experiment: Experiment
    name: str
    uri: str
    specs: list[RunSpec]
    client: MlflowClient
    experiment_id: str
    parent_run_id: str = ""
    point_run_ids: dict[str, str] = field(default_factory=dict)  # config hash -> run id
    failures: int = 0


def run_experiments(
    plans: Sequence[tuple[Experiment, Sequence[RunSpec]]],
    options: RunOptions,
    console: Console | None = None,
) -> RunSummary:
    """Train and track every grid point of every plan; see the module docstring."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: room for the comparison table
            console = Console(width=max(console.width, 160))
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


def _group_by_store(
    specs: Sequence[RunSpec], cli_uri: str | None
) -> list[tuple[str, str, list[RunSpec]]]:
    """Grid points by (MLflow experiment, store): a file normally maps to exactly one."""
    groups: dict[tuple[str, str], list[RunSpec]] = {}
    for spec in specs:
        name = spec.config.tracking.experiment_name or spec.experiment_name
        uri = resolve_tracking_uri(cli_uri, spec.config.tracking.uri)
        groups.setdefault((name, uri), []).append(spec)
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
    from stackwise import __version__

    prepare_store(uri)
    client = open_client(uri)
    experiment_id = get_or_create_experiment(client, uri, name)
    grid = _Grid(experiment, name, uri, specs, client, experiment_id)
    if is_local_store(uri):
        _mark_abandoned_runs(grid)

    # The parent run is "alive" while this process holds its lock (see _mark_abandoned_runs).
    parent_lock_name = f"grid-{uuid.uuid4().hex}"
    parent_lock = FileLock(lock_path(uri, parent_lock_name))
    parent_lock.acquire()
    tags = {
        TAG_ROLE: "grid",
        TAG_VERSION: __version__,
        TAG_FILE: str(experiment.path),
        TAG_LOCK: parent_lock_name,
        "grid.points": str(len(specs)),
        "mlflow.source.name": "stackwise run",
    }
    commit = _commit()
    if commit is not None:
        tags[TAG_GIT_COMMIT] = commit
    parent = retry_locked(
        lambda: client.create_run(
            experiment_id, run_name=f"{name} {time.strftime('%Y-%m-%d %H:%M:%S')}", tags=tags
        )
    )
    grid.parent_run_id = parent.info.run_id
    summary.parent_run_ids[name] = grid.parent_run_id
    progress.print(
        f"[bold]{name}[/]: {len(specs)} run(s) → {uri} (parent run {grid.parent_run_id})"
    )
    if experiment.path.is_file():
        retry_locked(lambda: client.log_artifact(grid.parent_run_id, str(experiment.path)))

    status = "FINISHED"
    try:
        deferred = []
        for spec in specs:
            if not _run_point(grid, spec, options, progress, summary, wait=False):
                deferred.append(spec)
        for spec in deferred:  # busy in another process: wait for it, then skip or run
            progress.print(f"  {spec.name}: running in another process, waiting for it")
            _run_point(grid, spec, options, progress, summary, wait=True)
        _finish_grid(grid, progress)
        if grid.failures:
            status = "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        retry_locked(lambda: client.set_terminated(grid.parent_run_id, status=status))
        parent_lock.release()


def _mark_abandoned_runs(grid: _Grid) -> None:
    """RUNNING runs whose process is gone (lock free) become KILLED; resume reuses them."""
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
        run_id, tags = run.info.run_id, run.data.tags
        if tags.get(TAG_ROLE) == "grid" and TAG_LOCK in tags:
            alive = is_locked(lock_path(grid.uri, tags[TAG_LOCK]))
        elif tags.get(TAG_ROLE) == "point" and TAG_CONFIG_HASH in tags:
            alive = is_locked(_point_lock_path(grid, tags[TAG_CONFIG_HASH]))
        else:
            continue
        if not alive:
            retry_locked(functools.partial(grid.client.set_terminated, run_id, status="KILLED"))


def _point_lock_path(grid: _Grid, config_hash: str) -> Path:
    return lock_path(grid.uri, f"point-{grid.experiment_id}-{config_hash}")


def _finished_run(grid: _Grid, config_hash: str) -> Run | None:
    from mlflow.entities import ViewType

    runs = retry_locked(
        lambda: grid.client.search_runs(
            [grid.experiment_id],
            filter_string=(
                f"tags.`{TAG_CONFIG_HASH}` = '{config_hash}' and attributes.status = 'FINISHED'"
            ),
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1,
            order_by=["attributes.end_time DESC"],
        )
    )
    return runs[0] if runs else None


def _run_point(
    grid: _Grid,
    spec: RunSpec,
    options: RunOptions,
    progress: GridProgress,
    summary: RunSummary,
    wait: bool,
) -> bool:
    """Skip, resume or train one grid point. False when another process holds it (not waiting)."""
    lock = FileLock(_point_lock_path(grid, spec.config_hash))
    if not lock.acquire(blocking=wait):
        return False
    try:
        finished = _finished_run(grid, spec.config_hash)
        if finished is not None and not options.force:
            grid.point_run_ids[spec.config_hash] = finished.info.run_id
            summary.run_ids[(grid.name, spec.name)] = finished.info.run_id
            message = f"already FINISHED (run {finished.info.run_id})"
            summary.skipped.append((grid.name, spec.name, message))
            progress.print(f"  [dim]↷ {spec.name}: {message}[/]")
            return True
        _train_point(grid, spec, options, progress, summary)
        return True
    finally:
        progress.run_done()
        lock.release()


def _resumable_run(grid: _Grid, folder: Path, force: bool) -> str | None:
    """The MLflow run id to resume into, from the newest checkpoint in `folder` (if usable)."""
    from mlflow.exceptions import MlflowException

    from stackwise.training.checkpoint import read_checkpoint_metadata

    if force:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    metadata = read_checkpoint_metadata(folder) if folder.exists() else None
    run_id = (metadata or {}).get(CHECKPOINT_RUN_ID)
    if run_id:
        try:
            run = retry_locked(lambda: grid.client.get_run(run_id))
        except MlflowException:
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            return run_id
    # A checkpoint without a live run (deleted in the UI, another store) cannot be resumed into.
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _train_point(
    grid: _Grid,
    spec: RunSpec,
    options: RunOptions,
    progress: GridProgress,
    summary: RunSummary,
) -> None:
    client = grid.client
    folder = checkpoint_dir(grid.uri, grid.name, spec.config_hash)
    run_id = _resumable_run(grid, folder, options.force)
    resumed = run_id is not None
    if run_id is None:
        tags = run_tags(spec.config, spec.coordinates, spec.config_hash, spec.name, spec.file)
        tags[TAG_PARENT] = grid.parent_run_id
        tags["mlflow.source.name"] = "stackwise run"
        run = retry_locked(
            lambda: client.create_run(grid.experiment_id, run_name=spec.name, tags=tags)
        )
        run_id = run.info.run_id
        params = run_params(spec.config, spec.coordinates)
        if spec.config.model.vocab_size is None:  # known once the tokenizer exists (`_train`)
            params.pop("model.vocab_size", None)
        log_params(client, run_id, params)
        retry_locked(lambda: client.log_text(run_id, spec.config.to_yaml(), "config.yaml"))
    else:
        retry_locked(lambda: client.update_run(run_id, status="RUNNING"))
        # Re-parent under this invocation, so its parent run lists the whole grid.
        set_tags(client, run_id, {TAG_PARENT: grid.parent_run_id, "resumed": "true"})
    grid.point_run_ids[spec.config_hash] = run_id
    summary.run_ids[(grid.name, spec.name)] = run_id

    verb = "resuming" if resumed else "training"
    progress.print(f"  ▶ {spec.name}: {verb} (run {run_id})")
    started = time.perf_counter()
    logger: MlflowLogger | None = None
    monitor: Any = None
    try:
        logger, monitor, final = _train(grid, spec, run_id, folder, progress, resumed)
        logger.close()
        if monitor is not None:
            monitor.finish()
            monitor = None
        retry_locked(lambda: client.set_terminated(run_id, status="FINISHED"))
        shutil.rmtree(folder, ignore_errors=True)
    except KeyboardInterrupt:
        _close_quietly(logger, monitor)
        retry_locked(lambda: client.set_terminated(run_id, status="KILLED"))
        raise
    except Exception as error:
        _close_quietly(logger, monitor)
        message = f"{type(error).__name__}: {error}"
        _record_failure(client, run_id, message, traceback.format_exc())
        grid.failures += 1
        summary.failed.append((grid.name, spec.name, message))
        progress.print(f"  [red]✗ {spec.name}: FAILED — {message}[/]", important=True)
        return
    elapsed = time.perf_counter() - started
    loss = final.get("final_val_loss")
    shown = f"val loss {loss:.4f}" if loss is not None else "no validation loss"
    summary.finished.append((grid.name, spec.name, f"{shown}, {elapsed:.1f} s"))
    progress.print(f"  [green]✓ {spec.name}[/]: {shown} ({elapsed:.1f} s)")


def _train(
    grid: _Grid,
    spec: RunSpec,
    run_id: str,
    folder: Path,
    progress: GridProgress,
    resumed: bool = False,
) -> tuple[MlflowLogger, Any, dict[str, float]]:
    """Build data and rack, train with logging, log the model. Returns what must be closed."""
    from stackwise.data import build_data
    from stackwise.model.architecture import create_rack_from_config
    from stackwise.tracking.models import log_rack
    from stackwise.training.architecture_trainer import ArchitectureTrainer

    config = spec.config
    data = build_data(config.data, config.training)
    if config.model.vocab_size is None:
        config = config.model_copy(deep=True)
        config.model.vocab_size = data.tokenizer.vocab_size
        # The same value again on resume, which MLflow accepts.
        log_params(grid.client, run_id, {"model.vocab_size": str(config.model.vocab_size)})
    rack = create_rack_from_config(config)
    training = config.training
    logger = MlflowLogger(
        grid.client,
        run_id,
        tokens_per_step=training.batch_size * training.grad_accum_steps * training.seq_len,
        # Steps logged before the interruption are replayed exactly; record them only once.
        already_logged=logged_steps(grid.client, run_id) if resumed else None,
    )
    monitor = None
    if config.tracking.system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=5, resume_logging=True, tracking_uri=grid.uri
        )
        monitor.start()
    try:
        trainer = ArchitectureTrainer(
            config,
            callbacks=[logger, progress.start_run(spec.name)],
            checkpoint_dir=folder,
            resume=True,
            checkpoint_metadata={CHECKPOINT_RUN_ID: run_id, TAG_CONFIG_HASH: spec.config_hash},
            mask_token_id=data.tokenizer.mask_id,
        )
        results = trainer.train_architecture(rack, data.train_loader, data.val_loader)
        extra = {
            "parameters": float(rack.get_parameter_count()),
            "train_corpus_tokens": float(data.train_tokens),
            "val_corpus_tokens": float(data.val_tokens),
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


def _record_failure(client: MlflowClient, run_id: str, message: str, trace: str) -> None:
    short = message if len(message) <= ERROR_TAG_LIMIT else message[: ERROR_TAG_LIMIT - 3] + "..."
    try:
        set_tags(client, run_id, {TAG_ERROR: short})
        retry_locked(lambda: client.log_text(run_id, trace, "error.txt"))
    finally:
        retry_locked(lambda: client.set_terminated(run_id, status="FAILED"))


def _finish_grid(grid: _Grid, progress: GridProgress) -> None:
    """The comparison table (printed, and saved with plots as parent-run artifacts)."""
    import tempfile

    import polars as pl

    from stackwise.tracking.compare import render, runs_frame, save_plots, to_markdown

    order = [
        grid.point_run_ids[s.config_hash] for s in grid.specs if s.config_hash in grid.point_run_ids
    ]
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
            to_markdown(frame.drop("run_id", "parent_run_id", "config_hash")), encoding="utf-8"
        )
        try:
            save_plots(grid.client, frame, folder)
        except Exception as error:  # a plot must never cost the grid its table
            progress.print(f"  [yellow]plots skipped: {error}[/]")
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
            table.add_row(experiment, run, label, message)
    console.print(table)
    counts = (
        f"{len(summary.finished)} finished, {len(summary.skipped)} skipped, "
        f"{len(summary.failed)} failed"
    )
    console.print(counts if not summary.failed else f"[red]{counts}[/]")
