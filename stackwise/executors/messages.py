"""What travels between the driver and the process that runs a point: JSON, data and never code.

A point (`RunSpec`), the run options and the outcome (`PointOutcome`) each have a
``*_to_json``/``*_from_json`` pair; a ``--jobs`` or torchrun worker reads its task from a file
(`read_task`) and writes the outcome back to one (`write_outcome`, atomically). `in_folder`
runs the point in the driver's working folder, where relative paths of experiment files and
stores point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stackwise.config.experiment import RunSpec
    from stackwise.runner import PointOutcome, RunOptions


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


def read_task(path: Path) -> dict[str, Any]:
    """A worker's task file (written by the driver): context, spec, options, wait, cwd, result."""
    task: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return task


def write_outcome(path: Path, data: dict[str, Any]) -> None:
    """Write a point's outcome for the driver; atomically, so it never reads half a file."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data), encoding="utf-8")
    os.replace(temporary, path)
