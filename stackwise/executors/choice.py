"""Choosing where the points of a grid train, from `stackwise run`'s flags.

`choose_executor` checks that the flags go together and that every point can train that way
(`distributed_problems` for ``--nproc`` and torchrun), then returns the executor: ``--jobs``
(`stackwise.executors.local`), ``--executor ray`` (`stackwise.executors.ray`), ``--nproc``
(`stackwise.executors.torchrun`), or None for one point after another in this process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stackwise.config.experiment import RunSpec


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
