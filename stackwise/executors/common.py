"""What every executor shares on the driver's side: the error it gives the user, the board that
counts its points, and the cores it may hand out."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from stackwise.tracking.progress import plain

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
