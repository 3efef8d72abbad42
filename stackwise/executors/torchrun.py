"""One grid point over several processes: ``stackwise run FILE --nproc N`` and ``torchrun``.

1. `TorchrunExecutor` (``--nproc N``) launches, for each point in turn, ``torchrun --standalone
   --nproc-per-node N -m stackwise.executors.worker TASK.json``: N ranks on this machine, gloo
   on the CPU (the cores split between the ranks), nccl on GPUs (one GPU per rank).
2. In that launch rank 0 runs the point exactly as the local runner does
   (`stackwise.executors.point.run_point`: skip, resume, adopt, MLflow, checkpoints). Right
   before its trainer starts, its `BroadcastLockstep` sends the other ranks what they need to
   train the same point (config, checkpoint folder, whether to resume) as JSON; they build the
   same data and rack and train in step (`follow`, with `stackwise.train`), with no callbacks
   and no checkpoints of their own.
   The trainer itself shards every batch by rank and wraps the trainable forward in DDP
   (`stackwise.training.distributed`). When rank 0 is done with the point it tells the others.
3. Every rank resumes from the checkpoint folder rank 0 writes, so a point resumes with the same
   number of processes (a checkpoint of another world size starts over inside its run); across
   nodes that folder must be on a shared filesystem.
4. A failure on any rank ends the launch (torchrun stops the others); the driver marks the point
   FAILED if rank 0 has not, and goes on with the next point. Ctrl-C, SIGTERM and SIGHUP on the
   driver go to the launch (torchrun hands them to every rank: rank 0 checkpoints and marks its
   run KILLED); a launch still there after `STOP_GRACE_S`, or at a second Ctrl-C, is killed.
5. ``torchrun … -m stackwise run FILES`` (several nodes; see the README) runs a whole grid this
   way: rank 0 is the driver (`run_grid_on_ranks`), the other ranks follow every point; a failed
   point ends that launch (its parent run FAILED), and running the same command again skips the
   finished points and resumes the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stackwise.executors.common import PointBoard, available_cpus, driver_folder
from stackwise.executors.messages import (
    options_to_json,
    outcome_from_json,
    outcome_to_json,
    spec_to_json,
    write_outcome,
)
from stackwise.executors.point import mark_lost_point, run_point
from stackwise.runner.signals import signals_deferred

if TYPE_CHECKING:
    from stackwise.config.experiment import RunSpec
    from stackwise.runner import GridContext, Point, PointOutcome, RunOptions
    from stackwise.tracking.progress import GridProgress

STOP_GRACE_S = 120.0


class LockstepBroken(RuntimeError):
    """A point failed on rank 0 while the other ranks trained it: this launch cannot go on."""


class BroadcastLockstep:
    """Rank 0's side of the lockstep: tells the other ranks which point to train, and when
    there are no more."""

    def __init__(self, world: int, stop_on_failure: bool = False) -> None:
        self.world = world
        self.stop_on_failure = stop_on_failure
        self.broken = False
        self.closed = False

    def begin(self, point: Point, folder: Path) -> None:
        from stackwise.training.checkpoint import latest_checkpoint
        from stackwise.training.distributed import broadcast_json

        broadcast_json(
            {
                "kind": "train",
                "name": point.spec.name,
                "config": point.config.to_dict(),
                "folder": str(folder),
                "resume": latest_checkpoint(folder) is not None,
            }
        )

    def failed(self, message: str) -> None:
        # The other ranks stopped with the same error or are stuck in a collective: either way
        # this launch ends here (torchrun stops them when this process exits non-zero).
        self.broken = True
        if self.stop_on_failure:
            raise LockstepBroken(message)

    def close(self) -> None:
        """No more points: the other ranks return."""
        from stackwise.training.distributed import broadcast_json

        if not self.closed and not self.broken:
            broadcast_json({"kind": "done"})
        self.closed = True


def follow() -> None:
    """A rank other than 0: train every point rank 0 announces, until it says it is done."""
    from stackwise.training.distributed import broadcast_json

    while True:
        message = broadcast_json(None)
        if message["kind"] == "done":
            return
        _train_as_follower(message)


def _train_as_follower(message: dict[str, Any]) -> None:
    from stackwise.api import train
    from stackwise.config.base import StackWiseConfig
    from stackwise.training.architecture_trainer import TrainingError
    from stackwise.training.checkpoint import latest_checkpoint

    config = StackWiseConfig.from_dict(message["config"])
    folder = Path(message["folder"])
    resume = bool(message["resume"])
    if resume and latest_checkpoint(folder) is None:
        raise TrainingError(
            f"{message['name']}: rank 0 resumes from {folder}, which this node cannot see; "
            "resuming a run over several nodes needs the store's checkpoint folder on a shared "
            "filesystem"
        )
    # No callbacks and no checkpoints of its own: rank 0 records and saves (the trainer writes
    # checkpoints on rank 0 only; the folder is where every rank resumes from).
    train(config, checkpoint_dir=folder, resume=resume)


def _device_type(spec: RunSpec) -> str:
    from stackwise.training.device import resolve_device

    return resolve_device(spec.config.training.device).type


def run_point_on_ranks(
    context: GridContext, spec: RunSpec, options: RunOptions, wait: bool, result: Path
) -> int:
    """One rank of a ``--nproc`` launch for one point; rank 0 writes the outcome to `result`.
    Returns the exit status (1 on rank 0 when the point failed after training began)."""
    from stackwise.training.distributed import destroy_process_group, init_process_group

    ranks = init_process_group(_device_type(spec))
    try:
        if not ranks.is_main:
            follow()
            return 0
        lockstep = BroadcastLockstep(ranks.world)
        try:
            outcome = run_point(context, spec, replace(options, lockstep=lockstep), wait=wait)
        except KeyboardInterrupt as error:
            write_outcome(result, {"status": "killed", "message": "interrupted", "run_id": None})
            return 128 + int(getattr(error, "signum", signal.SIGINT))
        write_outcome(result, outcome_to_json(outcome))
        if lockstep.broken:
            return 1
        lockstep.close()
        return 0
    finally:
        destroy_process_group()


def run_grid_on_ranks(plans: Any, options: RunOptions) -> Any:
    """``torchrun … -m stackwise run FILES``: rank 0 runs the grid as the driver (returns its
    `RunSummary`), every other rank follows its points (returns None)."""
    from stackwise.runner import run_experiments
    from stackwise.training.distributed import destroy_process_group, init_process_group

    devices = {_device_type(spec) for _, specs in plans for spec in specs}
    ranks = init_process_group("cuda" if "cuda" in devices else "cpu")
    try:
        if not ranks.is_main:
            follow()
            return None
        lockstep = BroadcastLockstep(ranks.world, stop_on_failure=True)
        try:
            return run_experiments(plans, replace(options, lockstep=lockstep))
        finally:
            lockstep.close()
    finally:
        destroy_process_group()


class TorchrunExecutor:
    """Each point as a ``torchrun`` launch of `nproc` processes on this machine."""

    def __init__(self, nproc: int, cpus: int | None = None) -> None:
        self.nproc = nproc
        self.cpus = cpus if cpus is not None else available_cpus()

    def command(self, task: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={self.nproc}",
            "-m",
            "stackwise.executors.worker",
            str(task),
        ]

    def run_points(
        self,
        context: GridContext,
        specs: Sequence[RunSpec],
        options: RunOptions,
        progress: GridProgress,
    ) -> Iterator[tuple[RunSpec, PointOutcome]]:
        threads = options.threads or max(1, self.cpus // self.nproc)
        board = PointBoard(progress, len(specs), capacity=1)
        with driver_folder("torchrun") as (temp, held):
            queue = [(spec, False) for spec in specs]
            while queue:
                spec, wait = queue.pop(0)
                board.started(spec, f"torchrun, {self.nproc} processes x {threads} thread(s)")
                outcome = self._launch(context, spec, options, threads, wait, temp, held)
                board.finished(spec, outcome)
                if outcome.status == "busy":
                    queue.append((spec, True))
                else:
                    yield spec, outcome

    def _launch(
        self,
        context: GridContext,
        spec: RunSpec,
        options: RunOptions,
        threads: int,
        wait: bool,
        temp: Path,
        held: int,
    ) -> PointOutcome:
        task, result = temp / "task.json", temp / "result.json"
        result.unlink(missing_ok=True)
        task.write_text(
            json.dumps(
                {
                    "context": context.__dict__,
                    "spec": spec_to_json(spec),
                    "options": {**options_to_json(options), "threads": threads},
                    "wait": wait,
                    "cwd": os.getcwd(),
                    "result": str(result),
                }
            ),
            encoding="utf-8",
        )
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1",
            "TORCHELASTIC_ERROR_FILE": str(temp / "error.json"),
        }
        process = None
        try:
            with signals_deferred():  # a launch started is a launch the driver stops
                process = subprocess.Popen(
                    self.command(task),
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                    pass_fds=(held,),  # the folder's lock (see `driver_folder`)
                )
            code = process.wait()
        except BaseException as error:
            if process is not None:
                _stop(process, getattr(error, "signum", signal.SIGINT))
            raise
        if result.is_file():
            outcome = outcome_from_json(json.loads(result.read_text(encoding="utf-8")))
            if outcome.status != "killed" or code == 0:
                return outcome
        return mark_lost_point(
            context,
            spec,
            f"torchrun ({self.nproc} processes) exited with status {code} before the point "
            "ended (a rank failed or was killed; see the output above)",
        )


def _stop(process: subprocess.Popen[bytes], signum: int) -> None:
    """Forward the driver's stop signal to a torchrun launch, which forwards it to every rank
    (rank 0 checkpoints and marks its run KILLED; ranks that outlive torchrun's own shutdown
    timeout are killed by it); kill the launch if it outlives `STOP_GRACE_S`, or at once when
    Ctrl-C is pressed again (the first interrupt goes on). Returns once it has ended."""
    if process.poll() is None:
        process.send_signal(signum)
    with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
        process.wait(timeout=STOP_GRACE_S)
    if process.poll() is None:
        process.kill()
    process.wait()
