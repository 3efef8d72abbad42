"""``stackwise run --jobs N``: N grid points at once on this machine, one process each.

1. `job_slots` gives each of the N job slots its share of the machine: one GPU
   (``CUDA_VISIBLE_DEVICES``; round robin when there are fewer GPUs than jobs) where GPUs exist,
   and the CPU cores split between the jobs (``--threads`` per job when given, else
   cores // N, at least one), so N jobs never oversubscribe the cores.
2. Each point runs in its own process, ``python -m stackwise.executors.worker``, exactly as the
   local runner runs a point (`stackwise.executors.point.run_point`): the point locks and run
   ownership of the store keep concurrent processes from training one point twice. Its output
   goes to ``<store state>/logs/<experiment>/<point>.log``.
3. When a slot frees up the next point starts there; a point another process holds comes back
   ``busy`` and runs again at the end, waiting for its lock.
4. Ctrl-C, SIGTERM and SIGHUP reach every running job as the same signal (each saves its
   checkpoint and marks its run KILLED); a job that does not stop within `STOP_GRACE_S` (or
   at a second Ctrl-C) is killed, and the runner marks what it left RUNNING KILLED.
5. Task and result files live in a `driver_folder`, removed when the driver ends however it
   ends; one a killed driver left behind is swept by the next ``--jobs`` or ``--nproc`` run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from stackwise.executors.common import PointBoard, available_cpus, driver_folder
from stackwise.executors.messages import options_to_json, outcome_from_json, spec_to_json
from stackwise.executors.point import mark_lost_point
from stackwise.runner.signals import signals_deferred

if TYPE_CHECKING:
    from stackwise.config.experiment import RunSpec
    from stackwise.runner import GridContext, PointOutcome, RunOptions
    from stackwise.tracking.progress import GridProgress

STOP_GRACE_S = 120.0
POLL_S = 0.2
LOGS_DIR = "logs"


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out: ``CUDA_VISIBLE_DEVICES`` when set, else every CUDA
    device torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [item.strip() for item in listed.split(",") if item.strip() and item.strip() != "-1"]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


@dataclass(frozen=True)
class JobSlot:
    """What one of the concurrent jobs gets: its threads and, where GPUs exist, its GPU."""

    threads: int
    gpu: str | None = None

    def environment(self) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        return env

    def describe(self) -> str:
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return threads if self.gpu is None else f"GPU {self.gpu}, {threads}"


def job_slots(
    jobs: int, cpus: int, gpus: Sequence[str], threads: int | None = None
) -> list[JobSlot]:
    """The `jobs` slots of a machine with `cpus` cores and `gpus`: one GPU each (round robin),
    `threads` each when given, else the cores split evenly (at least one thread)."""
    per_job = threads if threads is not None else max(1, cpus // jobs)
    return [JobSlot(per_job, gpus[index % len(gpus)] if gpus else None) for index in range(jobs)]


@dataclass
class _Job:
    spec: RunSpec
    slot: int
    process: subprocess.Popen[bytes]
    result: Path
    log_path: Path
    log: IO[bytes] = field(repr=False)


class JobsExecutor:
    """Runs up to `jobs` points at once in subprocesses (see the module docstring)."""

    def __init__(self, jobs: int, gpus: Sequence[str] | None = None, cpus: int | None = None):
        self.jobs = jobs
        self.gpus = list(visible_gpus() if gpus is None else gpus)
        self.cpus = cpus if cpus is not None else available_cpus()

    def slots(self, threads: int | None) -> list[JobSlot]:
        return job_slots(self.jobs, self.cpus, self.gpus, threads)

    def run_points(
        self,
        context: GridContext,
        specs: Sequence[RunSpec],
        options: RunOptions,
        progress: GridProgress,
    ) -> Iterator[tuple[RunSpec, PointOutcome]]:
        from stackwise.tracking.store import local_root

        slots = self.slots(options.threads)
        board = PointBoard(progress, len(specs))
        logs = local_root(context.uri) / LOGS_DIR / _safe(context.name)
        logs.mkdir(parents=True, exist_ok=True)
        free = list(range(len(slots)))
        queue = [(spec, False) for spec in specs]
        deferred: list[tuple[RunSpec, bool]] = []
        running: list[_Job] = []
        with driver_folder("jobs") as (temp, held):
            try:
                while queue or running or deferred:
                    if not queue and not running:
                        queue, deferred = deferred, []
                    while queue and free:
                        spec, wait = queue.pop(0)
                        slot = free.pop(0)
                        with signals_deferred():  # a job started is a job the driver stops
                            job = self._start(
                                context, spec, options, slots[slot], slot, wait, temp, logs, held
                            )
                            running.append(job)
                        board.started(spec, f"{slots[slot].describe()}, log {job.log_path}")
                    time.sleep(POLL_S)
                    for job in [j for j in running if j.process.poll() is not None]:
                        running.remove(job)
                        free.append(job.slot)
                        job.log.close()
                        outcome = self._outcome(context, job)
                        board.finished(job.spec, outcome)
                        if outcome.status == "busy":
                            deferred.append((job.spec, True))
                        else:
                            yield job.spec, outcome
            except BaseException as error:
                _stop(running, getattr(error, "signum", signal.SIGINT))
                raise

    def _start(
        self,
        context: GridContext,
        spec: RunSpec,
        options: RunOptions,
        slot: JobSlot,
        index: int,
        wait: bool,
        temp: Path,
        logs: Path,
        held: int,
    ) -> _Job:
        stem = f"{index}-{_safe(spec.name)}"
        task_path, result = temp / f"{stem}.task.json", temp / f"{stem}.result.json"
        result.unlink(missing_ok=True)
        job_options = options_to_json(options)
        job_options["threads"] = slot.threads
        task_path.write_text(
            json.dumps(
                {
                    "context": context.__dict__,
                    "spec": spec_to_json(spec),
                    "options": job_options,
                    "wait": wait,
                    "cwd": os.getcwd(),
                    "result": str(result),
                }
            ),
            encoding="utf-8",
        )
        log_path = logs / f"{_safe(spec.name)}.log"
        log = log_path.open("ab")
        env = {**os.environ, **slot.environment(), "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", "stackwise.executors.worker", str(task_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            # Its own session: a terminal's Ctrl-C reaches the driver, which forwards it.
            start_new_session=True,
            pass_fds=(held,),  # the folder's lock: kept while the job runs, even without us
        )
        return _Job(spec, index, process, result, log_path, log)

    @staticmethod
    def _outcome(context: GridContext, job: _Job) -> PointOutcome:
        if job.result.is_file():
            outcome = outcome_from_json(json.loads(job.result.read_text(encoding="utf-8")))
            job.result.unlink()
            return outcome
        code = job.process.returncode
        how = (
            f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        )
        return mark_lost_point(
            context, job.spec, f"the job's process {how} before the point ended; see {job.log_path}"
        )


def _stop(running: list[_Job], signum: int) -> None:
    """Forward the driver's stop signal to every running job; kill what outlives the grace, or
    all that still runs as soon as Ctrl-C is pressed again. Returns once every job has ended."""
    for job in running:
        if job.process.poll() is None:
            job.process.send_signal(signum)
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        for job in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass  # interrupted again: no more waiting (the first interrupt goes on)
    for job in running:
        if job.process.poll() is None:
            job.process.kill()
        job.process.wait()
        job.log.close()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=," else "_" for c in name)[:120]
