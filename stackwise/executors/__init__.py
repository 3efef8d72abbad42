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
   without an outcome (killed, lost node) is marked FAILED with the error by `mark_lost_point`;
   the other points go on, and the exit status is 1.
5. A point that another process holds comes back ``busy`` and is run again at the end, waiting
   for its lock (as the local runner does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from stackwise.config.experiment import RunSpec
    from stackwise.runner import GridContext, PointOutcome, RunOptions
    from stackwise.tracking.progress import GridProgress


class ExecutorError(Exception):
    """An executor cannot be used as asked (a missing extra, an unreachable cluster): a
    one-line message for the user."""


# --------------------------------------------------------------------------------------------
# one point, in whatever process runs it
# --------------------------------------------------------------------------------------------


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
        PointOutcome,
        RunSummary,
        _Grid,
        _run_point,
        signals_as_interrupts,
    )
    from stackwise.tracking.progress import GridProgress
    from stackwise.tracking.store import open_client

    with signals_as_interrupts():
        if options.threads is not None:
            import torch

            torch.set_num_threads(options.threads)
        client = open_client(context.uri)
        grid = _Grid(
            None,
            context.name,
            context.uri,
            [spec],
            client,
            context.experiment_id,
            parent_run_id=context.parent_run_id,
        )
        summary = RunSummary()
        with GridProgress(1, quiet=options.quiet, console=console) as progress:
            if not _run_point(grid, spec, options, progress, summary, wait=wait):
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
    by a signal) becomes FAILED with `message` as its error; a point that died before its run
    existed is only reported."""
    from mlflow.entities import ViewType

    from stackwise.runner import PointOutcome, _record_failure
    from stackwise.tracking.logger import TAG_PARENT
    from stackwise.tracking.store import open_client, retry_locked

    client = open_client(context.uri)
    runs = retry_locked(
        lambda: client.search_runs(
            [context.experiment_id],
            filter_string=(
                f"tags.`{TAG_PARENT}` = '{context.parent_run_id}' "
                f"and attributes.run_name = '{_quoted(spec.name)}'"
            ),
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=10,
            order_by=["attributes.start_time DESC"],
        )
    )
    for run in runs:
        if run.info.status in ("RUNNING", "KILLED"):
            _record_failure(client, run.info.run_id, message, message + "\n")
            return PointOutcome("failed", message, run.info.run_id)
        if run.info.status == "FAILED":  # recorded by the point itself before its process died
            error = run.data.tags.get("error", message)
            return PointOutcome("failed", error, run.info.run_id)
    return PointOutcome("failed", message)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


# --------------------------------------------------------------------------------------------
# what travels to another process (JSON: data, never code)
# --------------------------------------------------------------------------------------------


def spec_to_json(spec: RunSpec) -> dict[str, Any]:
    return {
        "experiment_name": spec.experiment_name,
        "file": str(spec.file),
        "name": spec.name,
        "coordinates": dict(spec.coordinates),
        "config": spec.config.to_dict(),
        "config_hash": spec.config_hash,
        "tuned": dict(spec.tuned),
        "seed": spec.seed,
        "point": spec.point,
    }


def spec_from_json(data: dict[str, Any]) -> RunSpec:
    from stackwise.config.base import StackWiseConfig
    from stackwise.config.experiment import RunSpec

    return RunSpec(
        experiment_name=data["experiment_name"],
        file=Path(data["file"]),
        name=data["name"],
        coordinates=dict(data["coordinates"]),
        config=StackWiseConfig.from_dict(data["config"]),
        config_hash=data["config_hash"],
        tuned=dict(data.get("tuned", {})),
        seed=data.get("seed"),
        point=data.get("point", ""),
    )


def options_to_json(options: RunOptions) -> dict[str, Any]:
    return {"force": options.force, "quiet": options.quiet, "threads": options.threads}


def options_from_json(data: dict[str, Any]) -> RunOptions:
    from stackwise.runner import RunOptions

    return RunOptions(force=bool(data["force"]), quiet=bool(data["quiet"]), threads=data["threads"])


def outcome_to_json(outcome: PointOutcome) -> dict[str, Any]:
    return dataclasses.asdict(outcome)


def outcome_from_json(data: dict[str, Any]) -> PointOutcome:
    from stackwise.runner import PointOutcome

    return PointOutcome(str(data["status"]), str(data.get("message", "")), data.get("run_id"))


@contextlib.contextmanager
def in_folder(folder: str | None) -> Iterator[None]:
    """Work in `folder` (the driver's working folder, where relative paths of experiment files
    and stores point) when it exists here; else stay where we are."""
    if folder is None or not os.path.isdir(folder):
        yield
        return
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


# --------------------------------------------------------------------------------------------
# progress of points running elsewhere
# --------------------------------------------------------------------------------------------


class PointBoard:
    """Counts of a grid's points run by an executor, printed with every change:
    ``[3/8 done, 2 running, 1 failed]``."""

    def __init__(self, progress: GridProgress, total: int, capacity: int | None = None) -> None:
        self.progress = progress
        self.total = total
        self.capacity = capacity  # points that can run at once (others are queued)
        self.in_flight = 0
        self.done = 0
        self.failed = 0

    def status(self) -> str:
        running = self.in_flight if self.capacity is None else min(self.in_flight, self.capacity)
        queued = self.in_flight - running
        text = f"[{self.done}/{self.total} done, {running} running"
        if queued:
            text += f", {queued} queued"
        return text + f", {self.failed} failed]"

    def started(self, spec: RunSpec, where: str = "") -> None:
        self.in_flight += 1
        suffix = f" ({where})" if where else ""
        self.progress.print(f"  ▶ {spec.name}: started{suffix}  {self.status()}")

    def finished(self, spec: RunSpec, outcome: PointOutcome) -> None:
        self.in_flight -= 1
        if outcome.status == "busy":
            self.progress.print(f"  {spec.name}: running in another process, waiting for it")
            return
        if outcome.status in ("finished", "skipped"):
            self.done += 1
        else:
            self.failed += 1
        if outcome.status == "finished":
            line = f"  [green]✓ {spec.name}[/]: {outcome.message}"
        elif outcome.status == "skipped":
            line = f"  [dim]↷ {spec.name}: {outcome.message}[/]"
        else:
            line = f"  [red]✗ {spec.name}: FAILED — {outcome.message}[/]"
        failed = outcome.status not in ("finished", "skipped")
        self.progress.print(f"{line}  {self.status()}", important=failed)


@functools.lru_cache(maxsize=1)
def available_cpus() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# choosing the executor (what `stackwise run` calls)
# --------------------------------------------------------------------------------------------

EXECUTORS = ("local", "ray")


def under_torchrun() -> bool:
    """Whether this process is one rank of a torchrun launch of several processes (read from
    the environment torchrun sets, without importing torch)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    return all(name in os.environ for name in names) and os.environ["WORLD_SIZE"] != "1"


def choose_executor(
    plans: Sequence[tuple[Any, Sequence[RunSpec]]],
    executor: str = "local",
    *,
    address: str | None = None,
    cpus_per_run: float | None = None,
    gpus_per_run: float | None = None,
    jobs: int = 1,
    nproc: int = 1,
) -> Any:
    """The executor for `stackwise run`'s flags (None: points one after another in this
    process), after checking that the flags go together and that every point can run on it.
    Raises `ConfigError` (a flag or a setting that does not fit) or `ExecutorError` (Ray missing).
    """
    from stackwise.config.errors import ConfigError

    errors: list[ConfigError] = []
    if executor not in EXECUTORS:
        errors.append(
            ConfigError(
                f"{executor!r} is not an executor; use one of {', '.join(EXECUTORS)}",
                field="--executor",
            )
        )
    if executor != "ray":
        for flag, value in (
            ("--address", address),
            ("--cpus-per-run", cpus_per_run),
            ("--gpus-per-run", gpus_per_run),
        ):
            if value is not None:
                errors.append(ConfigError("only goes with --executor ray", field=flag))
    if jobs > 1 and executor == "ray":
        errors.append(
            ConfigError("the Ray cluster decides how many points run at once", field="--jobs")
        )
    if nproc > 1 and (jobs > 1 or executor == "ray"):
        errors.append(
            ConfigError(
                "runs one point at a time over N processes on this machine; it "
                "goes with neither --jobs nor --executor ray",
                field="--nproc",
            )
        )
    if under_torchrun() and (nproc > 1 or jobs > 1 or executor == "ray"):
        errors.append(
            ConfigError(
                "already running under torchrun: each point trains on its ranks",
                field="--nproc" if nproc > 1 else "--jobs" if jobs > 1 else "--executor",
            )
        )
    if nproc > 1 or under_torchrun():
        world = nproc if nproc > 1 else int(os.environ["WORLD_SIZE"])
        errors.extend(distributed_problems(plans, world))
    if errors:
        raise ConfigError.combine(errors)
    if executor == "ray":
        from stackwise.executors.ray import RayExecutor, import_ray

        import_ray()  # a one-line error naming the extra, before anything else
        return RayExecutor(address, cpus_per_run or 1.0, gpus_per_run)
    if jobs > 1:
        from stackwise.executors.local import JobsExecutor

        return JobsExecutor(jobs)
    if nproc > 1:
        from stackwise.executors.torchrun import TorchrunExecutor

        return TorchrunExecutor(nproc)
    return None


def distributed_problems(plans: Sequence[tuple[Any, Sequence[RunSpec]]], world: int) -> list[Any]:
    """Points that cannot train over `world` processes: a batch that does not split into equal
    shards, out-of-core training (one process only)."""
    from stackwise.config.errors import ConfigError
    from stackwise.config.experiment import setting_line

    errors: list[ConfigError] = []
    for experiment, specs in plans:
        for spec in specs:
            training = spec.config.training
            problems = []
            if training.batch_size % world:
                problems.append(
                    (
                        ("training", "batch_size"),
                        f"run {spec.name}: {training.batch_size} does not divide by the {world} "
                        "processes (each trains on an equal share of every batch)",
                    )
                )
            if training.out_of_core:
                problems.append(
                    (
                        ("training", "out_of_core"),
                        f"run {spec.name}: out-of-core training runs in one process; drop --nproc",
                    )
                )
            for path, message in problems:
                errors.append(
                    ConfigError(
                        message,
                        file=experiment.file,
                        field=".".join(path),
                        line=setting_line(experiment, spec, path),
                    )
                )
    return errors
