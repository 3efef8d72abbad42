"""One grid point, run in this process: skipped, resumed, adopted or trained, and recorded.

`point_of` resolves a point against this machine (its data, its fingerprint, its device) into
its run identity; `run_grid_point` takes the point's lock and skips it when a FINISHED run of
that identity exists, or else continues the run it finds (`_adoptable_run`: the run of its
newest checkpoint, or a RUNNING or KILLED run whose process is gone) or starts a new one, and
trains it (`stackwise.runner.train`). A failure is recorded on the run (`record_failure`).
"""

from __future__ import annotations

import functools
import json
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stackwise.runner.ownership import TAG_LOST, TAG_OWNER, point_lock_path
from stackwise.runner.train import CHECKPOINT_RUN_ID, close_quietly, train_in_run
from stackwise.tracking.logger import (
    TAG_CONFIG_HASH,
    TAG_ERROR,
    TAG_PARENT,
    TAG_ROLE,
    MlflowLogger,
    log_params,
    run_params,
    run_tags,
    set_tags,
)
from stackwise.tracking.metric_writer import UNSENT_METRICS_FILE
from stackwise.tracking.models import has_logged_model, retrain_command
from stackwise.tracking.progress import GridProgress, plain
from stackwise.tracking.store import (
    FileLock,
    TrackingUnavailable,
    checkpoint_dir,
    end_run_if_reachable,
    end_run_or_say_why,
    is_local_store,
    local_root,
    owner,
    owner_alive,
    release_interrupted_calls,
    retry_locked,
    server_gone,
    unreachable_reason,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from stackwise.config.base import StackWiseConfig
    from stackwise.config.experiment import RunSpec
    from stackwise.runner.grid import Grid
    from stackwise.runner.options import RunOptions
    from stackwise.runner.summary import RunSummary

TAG_DEVICE = "stackwise.device"  # device type the point trains on (part of its identity)
TAG_DATA = "stackwise.data_fingerprint"  # sha256 of the data's content (part of its identity)
FINGERPRINTS_FILE = "data-fingerprints.json"
ERROR_TAG_LIMIT = 5000


@dataclass(frozen=True)
class Point:
    """A grid point as it is run: its config with `data.paths` resolved, and its identity."""

    spec: RunSpec
    config: StackWiseConfig
    identity: str
    device_type: str
    data_fingerprint: str


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
        progress.run_done(spec.name)
        message = f"{type(error).__name__}: {error}"
        grid.failures += 1
        summary.failed.append((grid.name, spec.name, message))
        progress.print(f"  [red]✗ {plain(spec.name)}: FAILED — {plain(message)}[/]", important=True)
        return True
    lock = FileLock(point_lock_path(grid, point.identity))
    if not lock.acquire(blocking=wait):
        return False
    skipped = False
    try:
        finished = _finished_run(grid, point.identity)
        if finished is not None and not options.force:
            run_id = finished.info.run_id
            folder = checkpoint_dir(grid.uri, grid.name, point.identity)
            missing = point.config.tracking.log_model and not has_logged_model(grid.client, run_id)
            if missing and _final_checkpoint_of(folder, run_id):
                # Its final weights outlived it: log them from there (a resume with no step left).
                _train_point(grid, point, options, progress, summary, finishing=run_id)
                return True
            # A process killed between finishing and cleaning up leaves its checkpoints.
            shutil.rmtree(folder, ignore_errors=True)
            skip_finished(grid, spec, run_id, progress, summary, missing_model=missing)
            skipped = True
            return True
        _train_point(grid, point, options, progress, summary)
        return True
    finally:
        progress.run_done(spec.name, skipped=skipped)
        lock.release()


def skip_finished(
    grid: Grid,
    spec: RunSpec,
    run_id: str,
    progress: GridProgress,
    summary: RunSummary,
    missing_model: bool = False,
) -> None:
    """Record point `spec` as skipped: its run `run_id` already FINISHED."""
    grid.point_run_ids[spec.name] = run_id
    summary.run_ids[(grid.name, spec.name)] = run_id
    message = f"already FINISHED (run {run_id})"
    if missing_model:
        message += f" {_no_model_hint(spec)}"
    summary.skipped.append((grid.name, spec.name, message))
    style = "yellow" if missing_model else "dim"
    progress.print(f"  [{style}]↷ {plain(spec.name)}: {plain(message)}[/]", missing_model)


def finished_grid(grid: Grid) -> dict[str, str] | None:
    """Every point of `grid` with the FINISHED run that holds its result (and its model, when
    it logs one), by run name; None when some point has something left to train."""
    done: dict[str, str] = {}
    for spec in grid.specs:
        try:
            point = point_of(spec, grid.uri)
        except (OSError, ValueError, RuntimeError):
            return None  # the point itself says why, when it is run
        run = _finished_run(grid, point.identity)
        if run is None:
            return None
        if point.config.tracking.log_model and not has_logged_model(grid.client, run.info.run_id):
            return None
        done[spec.name] = run.info.run_id
    return done


def _final_checkpoint_of(folder: Path, run_id: str) -> bool:
    """Whether `folder` holds the last checkpoint of run `run_id`: every stage of its plan
    done (the stage-end checkpoint of its last stage), so its final weights."""
    from stackwise.training.checkpoint import latest_checkpoint

    path = latest_checkpoint(folder) if folder.exists() else None
    if path is None:
        return False
    try:
        metadata = json.loads((path / "metadata.json").read_text(encoding="utf-8"))
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        metadata.get(CHECKPOINT_RUN_ID) == run_id
        and not state.get("interrupted")
        and len(state.get("stage_results") or []) == len(state.get("plan") or [None])
    )


def _no_model_hint(spec: RunSpec) -> str:
    """What a FINISHED point without a logged model needs to get one: its checkpoints are
    removed when a run finishes, so it trains again (`--force`, this point only)."""
    return (
        "without a logged model: tracking.log_model was off when it trained, and its final "
        "weights were removed with its checkpoints when it finished; to log one, train it "
        f"again: {retrain_command(spec.file, spec.labels)} (with this command's other --set "
        "options, if any)"
    )


def _adoptable_run(grid: Grid, point: Point, folder: Path, force: bool) -> tuple[str | None, bool]:
    """The run to continue, under the point's lock: (run id or None, whether a checkpoint of it
    is there to resume from).

    First the run named by the newest checkpoint; else the newest RUNNING or KILLED run of this
    identity (its process is gone: we hold the lock), or FAILED only because its process died
    (`TAG_LOST`), restarted from scratch. `force` starts a new run.
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
        lost = run.info.status == "FAILED" and run.data.tags.get(TAG_LOST) == "true"
        if run.info.status not in ("RUNNING", "KILLED") and not lost:
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
    finishing: str | None = None,
) -> None:
    """Train the point in the run it continues, or a new one; `finishing`: a FINISHED run whose
    final checkpoint is still there, resumed (no step left) to log its model."""
    client, spec = grid.client, point.spec
    folder = checkpoint_dir(grid.uri, grid.name, point.identity)
    run_id: str | None
    if finishing is not None:
        run_id, has_checkpoint = finishing, True
    else:
        run_id, has_checkpoint = _adoptable_run(grid, point, folder, options.force)
    adopted = run_id is not None
    params = run_params(point.config, spec.coordinates)
    if point.config.model.vocab_size is None:  # known once the tokenizer exists (`train_in_run`)
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
            lambda: client.create_run(grid.experiment_id, run_name=spec.title, tags=tags)
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
        adopted_run = retry_locked(lambda: client.get_run(adopted_id))
        have = adopted_run.data.params
        log_params(client, run_id, {k: v for k, v in params.items() if k not in have})
        # A run FAILED by the loss of its process carries that error no more once continued.
        for key in (TAG_LOST, TAG_ERROR):
            if key in adopted_run.data.tags:
                retry_locked(functools.partial(client.delete_tag, run_id, key))
    new_id = run_id
    retry_locked(lambda: client.log_text(new_id, point.config.to_yaml(), "config.yaml"))
    grid.point_run_ids[spec.name] = run_id
    summary.run_ids[(grid.name, spec.name)] = run_id

    if finishing is not None:
        verb = "logging its model from its final checkpoint"
    elif has_checkpoint:
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
        logger, monitor, final = train_in_run(
            grid, point, run_id, folder, progress, adopted, lockstep=options.lockstep
        )
        logger.close()
        if monitor is not None:
            monitor.finish()
            monitor = None
        retry_locked(lambda: client.set_terminated(new_id, status="FINISHED"))
        shutil.rmtree(folder, ignore_errors=True)
    except KeyboardInterrupt as stop:
        close_quietly(logger, monitor)
        if isinstance(stop, TrackingUnavailable):
            _stopped_by_server(stop, grid, run_id, spec.name, folder)
        else:
            release_interrupted_calls(stop)  # a store call it cut short may hold the lock
            why = end_run_or_say_why(client, new_id, "KILLED")
            if why is not None:
                progress.print(f"  [yellow]{plain(why)}[/]", important=True)
        raise
    except Exception as error:
        close_quietly(logger, monitor)
        interrupt = _stop_behind(error)
        if interrupt is not None:  # it failed while stopping (saving its checkpoint): still a stop
            release_interrupted_calls(interrupt)
            progress.print(
                f"  [yellow]{plain(spec.name)}: stopped; while stopping: "
                f"{plain(f'{type(error).__name__}: {error}')}[/]",
                important=True,
            )
            why = end_run_or_say_why(client, new_id, "KILLED")
            if why is not None:
                progress.print(f"  [yellow]{plain(why)}[/]", important=True)
            raise interrupt from None
        if unreachable_reason(error) is not None:  # a store call MLflow's retries did not save
            gone = server_gone(grid.uri, error)
            _stopped_by_server(gone, grid, run_id, spec.name, folder)
            raise gone from error
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


def _stopped_by_server(
    stop: TrackingUnavailable, grid: Grid, run_id: str, name: str, folder: Path
) -> None:
    """A point stopped because the tracking server is gone: mark its run KILLED if the server
    takes that at once, and say what was kept for the rerun."""
    from stackwise.training.checkpoint import latest_checkpoint

    marked = end_run_if_reachable(grid.client, grid.uri, run_id, "KILLED")
    kept = f"run {name} stopped with a checkpoint in {folder}"
    if latest_checkpoint(folder) is None:
        kept = f"run {name} stopped before its first checkpoint"
    unsent = folder / UNSENT_METRICS_FILE
    if unsent.is_file():
        count = sum(1 for line in unsent.read_text(encoding="utf-8").splitlines() if line)
        kept += f" and {count} unsent metrics beside it"
    kept += ", marked KILLED" if marked else ", not marked KILLED (the server did not answer)"
    stop.details.append(kept)


def _stop_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or stop signal `error` was raised while handling, if any: an interrupt that
    lands in the middle of a lazy import (torch imports sympy on first use) leaves the module
    half made, and the checkpoint written on the way out then fails on it. A tracking server
    that is gone is not such a stop (`TrackingUnavailable` has its own handling)."""
    seen: set[int] = set()
    current: BaseException | None = error.__context__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, KeyboardInterrupt):
            return None if isinstance(current, TrackingUnavailable) else current
        current = current.__cause__ or current.__context__
    return None


def _point_tags(grid: Grid, point: Point) -> dict[str, str]:
    return {
        TAG_PARENT: grid.parent_run_id,
        TAG_OWNER: owner(),
        TAG_DEVICE: point.device_type,
        TAG_DATA: point.data_fingerprint,
    }


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
