"""What every executor shares on the driver's side: the error it gives the user, the board that
counts its points, the cores it may hand out, and the temporary folder of its task files."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from stackwise.tracking.progress import plain
from stackwise.tracking.store import is_locked

if TYPE_CHECKING:
    from stackwise.config.experiment import RunSpec
    from stackwise.runner import PointOutcome
    from stackwise.tracking.progress import GridProgress


class ExecutorError(Exception):
    """An executor cannot be used as asked (a missing extra, an unreachable cluster): a
    one-line message for the user."""


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
        self.progress.print(
            f"  ▶ {plain(spec.name)}: started{plain(suffix)}  {plain(self.status())}"
        )

    def finished(self, spec: RunSpec, outcome: PointOutcome) -> None:
        self.in_flight -= 1
        if outcome.status == "busy":
            self.progress.print(f"  {plain(spec.name)}: running in another process, waiting for it")
            return
        if outcome.status in ("finished", "skipped"):
            self.done += 1
        else:
            self.failed += 1
        if outcome.status == "finished":
            line = f"  [green]✓ {plain(spec.name)}[/]: {plain(outcome.message)}"
        elif outcome.status == "skipped":
            line = f"  [dim]↷ {plain(spec.name)}: {plain(outcome.message)}[/]"
        else:
            line = f"  [red]✗ {plain(spec.name)}: FAILED — {plain(outcome.message)}[/]"
        failed = outcome.status not in ("finished", "skipped")
        self.progress.print(f"{line}  {plain(self.status())}", important=failed)


@functools.lru_cache(maxsize=1)
def available_cpus() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


# A driver's temporary folder: <tmp>/stackwise-<kind>-<pid>-<random>, with a lock file the driver
# holds (and its jobs, which inherit it) for as long as any of them lives.
OWNER_LOCK = "owner.lock"
_DRIVER_FOLDER = re.compile(r"stackwise-(?:jobs|torchrun)-(\d+)-[^/]+")


@contextlib.contextmanager
def driver_folder(kind: str) -> Iterator[tuple[Path, int]]:
    """A temporary folder for the task and result files of a driver's jobs, and the descriptor
    of the lock that marks it in use (hand it to the jobs with ``pass_fds``, so the folder stays
    while any of them runs). It is removed when the block ends, however it ends; a driver killed
    outright (SIGKILL) cannot, so the folders of drivers whose processes are all gone are swept
    first (`sweep_driver_folders`)."""
    sweep_driver_folders()
    folder = Path(tempfile.mkdtemp(prefix=f"stackwise-{kind}-{os.getpid()}-"))
    try:
        handle = os.open(folder / OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield folder, handle
        finally:
            os.close(handle)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep_driver_folders(root: Path | None = None) -> list[Path]:
    """Remove the `driver_folder`s in `root` (the system's temporary folder) that nobody holds:
    the driver's process is gone (its pid is in the name) and so are its jobs (the lock is
    free). Returns the folders removed; others' folders that cannot be read are left alone."""
    removed = []
    for folder in (root or Path(tempfile.gettempdir())).glob("stackwise-*-*-*"):
        match = _DRIVER_FOLDER.fullmatch(folder.name)
        if match is None or not folder.is_dir() or _alive(int(match.group(1))):
            continue
        lock = folder / OWNER_LOCK
        try:
            stale = not lock.exists() or not is_locked(lock)
        except OSError:  # another user's folder
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
