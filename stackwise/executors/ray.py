"""``stackwise run --executor ray``: every grid point a Ray task, on a local or remote cluster.

1. `RayExecutor.connect` (called by the CLI before anything is written) imports Ray, which is
   the optional extra ``stackwise[ray]``, and joins the cluster: ``--address`` as Ray takes it
   (``auto``, ``ray://head:10001``), or without one a local cluster started here and shut down
   at the end. Resources per point: ``--cpus-per-run`` (default 1) and ``--gpus-per-run``
   (default one GPU when the cluster has GPUs, else none); a point asking for more than the
   cluster has is an error before anything runs.
2. `run_points` submits one task per point (`_point_task`, never retried by Ray: a point whose
   worker died is FAILED, and the rerun of the grid resumes or restarts it inside that run), each
   in a worker process of its own that ends with it (``max_calls=1``). The task runs the
   point exactly as the local runner does (`stackwise.executors.point.run_point`) with torch
   threads = its CPUs, in the driver's working folder where that exists on the node, and logs
   the child run into the driver's tracking store (a tracking server for a real cluster; a
   local sqlite store works for a local cluster). Points travel as JSON.
3. Outcomes come back as tasks complete; a task that raised or whose worker died marks its
   point FAILED with the error (`mark_lost_point`) and the others go on. Progress shows points
   done, running (tasks in flight up to what the cluster can run at once), queued and failed.
4. Ctrl-C, SIGTERM or SIGHUP on the driver cancels the tasks in flight (each receives
   KeyboardInterrupt: it saves a checkpoint and marks its run KILLED); a task still running
   after `CANCEL_GRACE_S` (or at a second Ctrl-C) is killed with its worker, and the runner marks
   KILLED what it left RUNNING. A local cluster is shut down on every way out but SIGKILL
   (which leaves Ray's dashboard and runtime-env agents for about a minute: they report the
   lost raylet to a GCS that is gone before they exit).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from stackwise.executors.common import ExecutorError, PointBoard
from stackwise.executors.messages import (
    in_folder,
    options_from_json,
    options_to_json,
    outcome_from_json,
    outcome_to_json,
    spec_from_json,
    spec_to_json,
)
from stackwise.executors.point import mark_lost_point, run_point
from stackwise.runner.signals import Interrupted, signals_deferred

if TYPE_CHECKING:
    from stackwise.config.experiment import RunSpec
    from stackwise.runner import GridContext, PointOutcome, RunOptions
    from stackwise.tracking.progress import GridProgress

EXTRA_HINT = "pip install 'stackwise[ray]'"
CANCEL_GRACE_S = 120.0
KILL_WAIT_S = 30.0


def import_ray() -> Any:
    """The `ray` module, or `ExecutorError` naming the extra that provides it."""
    try:
        import ray
    except ImportError as error:
        raise ExecutorError(
            f"--executor ray needs Ray, which is not installed: {EXTRA_HINT} "
            f"({type(error).__name__}: {error})"
        ) from None
    return ray


def _point_task(
    context: dict[str, str],
    spec: dict[str, Any],
    options: dict[str, Any],
    wait: bool,
    cwd: str | None,
) -> dict[str, Any]:
    """One grid point in a Ray worker (arguments and result are JSON-shaped data)."""
    from stackwise.runner import GridContext

    with in_folder(cwd):
        outcome = run_point(
            GridContext(**context), spec_from_json(spec), options_from_json(options), wait=wait
        )
    return outcome_to_json(outcome)


class RayExecutor:
    """Grid points as Ray tasks (see the module docstring)."""

    def __init__(
        self,
        address: str | None = None,
        cpus_per_run: float = 1.0,
        gpus_per_run: float | None = None,
        local_cpus: int | None = None,
    ) -> None:
        self.address = address
        self.cpus_per_run = cpus_per_run
        self.gpus_per_run = gpus_per_run
        self.local_cpus = local_cpus  # CPUs of a local cluster started here (default: all)
        self._ray: Any = None
        self._started = False
        self._reaper: Any = None  # ends the local cluster if this driver is killed outright
        self.capacity: int | None = None

    def connect(self) -> None:
        """Join (or start) the cluster and check that one point fits it; `ExecutorError` says
        why not."""
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "logging_level": "WARNING",
                "log_to_driver": True,
            }
            if self.address is None:
                kwargs.update(address="local", num_cpus=self.local_cpus)
            else:
                kwargs["address"] = self.address
            main = threading.current_thread() is threading.main_thread()
            sigterm = signal.getsignal(signal.SIGTERM) if main else None
            try:
                ray.init(**kwargs)
            except SystemExit as stop:  # SIGTERM meanwhile: ray.init's own handler exits
                if stop.code != signal.SIGTERM:
                    raise
                self._shutdown()
                raise Interrupted(signal.SIGTERM) from None
            except KeyboardInterrupt:
                self._shutdown()
                raise
            except Exception as error:  # ConnectionError, a bad address, a version mismatch
                where = self.address or "a local cluster"
                text = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise ExecutorError(
                    f"cannot start or join the Ray cluster ({where}): "
                    f"{type(error).__name__}: {text}"
                ) from None
            finally:
                # ray.init makes SIGTERM exit the process at once (no run marked KILLED, no
                # cluster shut down): the handler that was there (the runner's) takes it back.
                if sigterm is not None:
                    signal.signal(signal.SIGTERM, sigterm)
            self._started = True
            if self.address is None:
                from stackwise.executors.reaper import watch

                self._reaper = watch()
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        if self.gpus_per_run is None:
            self.gpus_per_run = 1.0 if gpus >= 1 else 0.0
        if self.cpus_per_run > cpus or self.gpus_per_run > gpus:
            self.close()
            raise ExecutorError(
                f"a point asks for {self.cpus_per_run:g} CPU(s) and {self.gpus_per_run:g} "
                f"GPU(s) but the Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s); lower "
                "--cpus-per-run / --gpus-per-run or add nodes"
            )
        fits = [cpus // self.cpus_per_run if self.cpus_per_run else float("inf")]
        if self.gpus_per_run:
            fits.append(gpus // self.gpus_per_run)
        self.capacity = max(1, int(min(fits)))

    def close(self) -> None:
        """Shut down a local cluster this executor started, with every process of it (a joined
        one stays; this driver leaves it); a signal meanwhile waits until it is down."""
        if self._started and self._ray is not None:
            self._shutdown()
        self._started = False
        if self._reaper is not None:  # the cluster is down: nothing left to watch
            self._reaper.kill()
            self._reaper.wait()
            self._reaper = None

    def _shutdown(self) -> None:
        with signals_deferred(), contextlib.suppress(Exception):
            self._ray.shutdown()

    def describe(self) -> str:
        return (
            f"Ray ({self.address or 'local cluster'}; {self.cpus_per_run:g} CPU, "
            f"{self.gpus_per_run or 0:g} GPU per point)"
        )

    def run_points(
        self,
        context: GridContext,
        specs: Sequence[RunSpec],
        options: RunOptions,
        progress: GridProgress,
    ) -> Iterator[tuple[RunSpec, PointOutcome]]:
        if self._ray is None:
            self.connect()
        ray = self._ray
        threads = options.threads or max(1, int(self.cpus_per_run))
        task = ray.remote(
            num_cpus=self.cpus_per_run,
            num_gpus=self.gpus_per_run or 0,
            max_retries=0,  # a killed point is FAILED; rerunning the grid resumes it
            # A worker process per point, ended with it: nothing a point holds (memory, a GPU,
            # an SQLite lock of a store call an interrupt cut short) outlives it in an idle
            # worker.
            max_calls=1,
        )(_point_task)
        # Workers' own lines would repeat the driver's (only failures are printed there).
        task_options = {**options_to_json(options), "threads": threads, "quiet": True}
        board = PointBoard(progress, len(specs), self.capacity)
        cwd = os.getcwd()

        def submit(spec: RunSpec, wait: bool) -> Any:
            ref = task.remote(context.__dict__, spec_to_json(spec), task_options, wait, cwd)
            board.started(spec)
            return ref

        in_flight: dict[Any, RunSpec] = {}
        try:
            for spec in specs:
                with signals_deferred():  # a task handed to Ray is a task this driver stops
                    in_flight[submit(spec, False)] = spec
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in ready:
                    spec = in_flight.pop(ref)
                    outcome = self._outcome(context, spec, ref)
                    board.finished(spec, outcome)
                    if outcome.status == "busy":
                        with signals_deferred():
                            in_flight[submit(spec, True)] = spec
                    else:
                        yield spec, outcome
        except BaseException:
            self._stop(list(in_flight))
            raise

    def _outcome(self, context: GridContext, spec: RunSpec, ref: Any) -> PointOutcome:
        ray = self._ray
        try:
            return outcome_from_json(ray.get(ref))
        except ray.exceptions.RayError as error:
            cause = getattr(error, "cause", None)
            what = cause if isinstance(cause, BaseException) else error
            text = str(what).strip().splitlines()
            message = f"{type(what).__name__}: {text[0] if text else 'the Ray task failed'}"
            return mark_lost_point(context, spec, message)

    def _stop(self, refs: list[Any]) -> None:
        """Interrupt the tasks in flight: each gets a KeyboardInterrupt (it checkpoints and
        marks its run KILLED); those still running after `CANCEL_GRACE_S`, or as soon as Ctrl-C
        is pressed again, are killed with their worker. Returns once they have ended (at most
        `KILL_WAIT_S` after the kill); the runner then marks KILLED what they left RUNNING."""
        ray = self._ray
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=False)
        pending = refs
        with contextlib.suppress(KeyboardInterrupt):  # the first interrupt goes on
            pending = self._wait(pending, CANCEL_GRACE_S)
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        with contextlib.suppress(KeyboardInterrupt):
            self._wait(pending, KILL_WAIT_S)

    def _wait(self, refs: list[Any], seconds: float) -> list[Any]:
        """Wait up to `seconds` for the tasks `refs` to end; those still running."""
        deadline = time.monotonic() + seconds
        pending = list(refs)
        while pending and time.monotonic() < deadline:
            _, pending = self._ray.wait(pending, num_returns=len(pending), timeout=1.0)
        return pending
