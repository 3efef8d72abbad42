"""How a grid is run, and what the runner and its executors pass each other.

`RunOptions` are the flags of `stackwise run`; an executor (`stackwise.executors`) gets a
grid's `GridContext`, runs its points wherever it chooses (`PointExecutor`) and hands back one
`PointOutcome` per point; under torchrun a `Lockstep` starts each point on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from stackwise.config.experiment import RunSpec
    from stackwise.runner.point import Point
    from stackwise.tracking.progress import GridProgress


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
