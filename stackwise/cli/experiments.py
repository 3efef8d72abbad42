"""Commands on experiment files that train nothing: `validate`, `plan` and `schema`.

`validate` and `plan` load and check every file and grid (`stackwise.preflight`); `plan` adds
each run's estimates (`stackwise.preflight.run_estimates`). `schema` writes the JSON Schemas
that editors use for experiment files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from stackwise import preflight
from stackwise.cli.options import (
    FilesArgument,
    MaxRunsOption,
    NoMemoryCheckOption,
    OnlyOption,
    SetOption,
    StrictOption,
)
from stackwise.cli.output import (
    EXIT_STALE,
    human_bytes,
    human_count,
    load_plans,
    note,
    runs_of,
    stderr_console,
    stdout_console,
    user_errors,
)


def validate(
    files: FilesArgument,
    set_: SetOption = None,
    only: OnlyOption = None,
    max_runs: MaxRunsOption = None,
    no_memory_check: NoMemoryCheckOption = False,
    strict: StrictOption = False,
) -> None:
    """Check experiment files and every run of their grids (and that each run fits its
    device's memory); print runs per file."""
    with user_errors():
        plans = load_plans(files, set_ or [], only or [], max_runs, not no_memory_check, strict)
    from stackwise.tracking.tables import Column, print_table

    console = stdout_console()
    print_table(
        console,
        [Column("File", key=True), Column("Experiment"), Column("Runs", numeric=True)],
        [[experiment.file, experiment.name, str(len(runs))] for experiment, runs in plans],
        title="Valid experiment files",
    )
    total = sum(len(runs) for _, runs in plans)
    console.print(f"{len(plans)} file{'s' if len(plans) != 1 else ''} valid, {runs_of(total)}.")


def plan(
    files: FilesArgument,
    set_: SetOption = None,
    only: OnlyOption = None,
    max_runs: MaxRunsOption = None,
    no_memory_check: NoMemoryCheckOption = False,
    strict: StrictOption = False,
) -> None:
    """Estimate each run (parameters, FLOPs, memory, device); trains nothing.

    For every run: total parameters, trainable parameters and optimizer steps per training
    stage, estimated training FLOPs (with the activation cache), estimated peak memory and the device.
    """
    with user_errors():
        plans = load_plans(files, set_ or [], only or [], max_runs, not no_memory_check, strict)
        preflight.check_devices(plans)
    from stackwise.tracking.tables import Column, print_table

    columns = [Column("Experiment", key=True), Column("Run", key=True)]
    columns += [Column("Params", numeric=True), Column("Trainable per stage")]
    columns += [Column("Steps per stage"), Column("Train FLOPs", numeric=True)]
    columns += [Column("Training memory", numeric=True), Column("Cache RAM / disk")]
    columns += [Column("Peak memory", numeric=True), Column("Device")]
    rows: list[list[str]] = []
    notes: list[str] = []
    total_flops = 0.0
    for experiment, run, estimate in preflight.run_estimates(plans):
        total_flops += estimate.flops
        missing = "-" if estimate.note else ""  # what could not be estimated is in the note
        rows.append(
            [
                experiment.name,
                run.name,
                human_count(estimate.total_parameters),
                _stage_summary([s.trainable_parameters for s in estimate.stages]) or missing,
                _stage_summary([s.steps for s in estimate.stages], _plain) or missing,
                human_count(estimate.flops) if not estimate.note else missing,
                human_bytes(estimate.training_memory_bytes) if not estimate.note else missing,
                f"{human_bytes(estimate.cache_memory_bytes)} / "
                f"{human_bytes(estimate.cache_disk_bytes)}"
                if not estimate.note
                else missing,
                ("≥ " if estimate.note else "") + human_bytes(estimate.peak_memory_bytes),
                estimate.device,
            ]
        )
        if estimate.note:
            notes.append(f"{experiment.file}: run {run.name}: {estimate.note}")
    console = stdout_console()
    print_table(console, columns, rows, title="Planned runs")
    for message in notes:
        note(message)
    count = sum(len(runs) for _, runs in plans)
    console.print(f"{runs_of(count)}, {human_count(total_flops)} training FLOPs in total.")


def _plain(n: int) -> str:
    return str(n)


def _stage_summary(trainable: Sequence[int], show: Callable[[int], str] = human_count) -> str:
    """A number per stage, consecutive equal stages folded: '312k, 264k x3'."""
    parts: list[str] = []
    index = 0
    while index < len(trainable):
        end = index
        while end + 1 < len(trainable) and trainable[end + 1] == trainable[index]:
            end += 1
        repeat = end - index + 1
        parts.append(show(trainable[index]) + (f" x{repeat}" if repeat > 1 else ""))
        index = end + 1
    return ", ".join(parts)


def schema(
    directory: Annotated[
        Path, typer.Option("--dir", help="Folder of the schema files.", file_okay=False)
    ] = Path("schemas"),
    check: Annotated[
        bool,
        typer.Option("--check", help="Only check that the files are current (exit 1 if not)."),
    ] = False,
) -> None:
    """Regenerate the JSON Schemas that editors use to complete and check experiment files."""
    from stackwise.config.experiment import stale_json_schemas, write_json_schemas

    console = stdout_console()
    if check:
        stale = stale_json_schemas(directory)
        if stale:
            errors = stderr_console()
            for path in stale:
                # A file that is not there is missing (run outside the project, or a wrong
                # --dir), not out of date.
                state = "stale" if path.exists() else "missing"
                errors.print(Text(f"{state}: {path}", style="red"))
            where = "" if Path(directory).is_dir() else f" ({directory} is not a folder here)"
            errors.print(Text(f"Run `stackwise schema --dir {directory}` to write them{where}."))
            raise typer.Exit(EXIT_STALE)
        console.print(f"JSON Schemas in {directory} are up to date.")
        return
    changed = write_json_schemas(directory)
    for path in changed:
        console.print(f"wrote {path}")
    if not changed:
        console.print(f"JSON Schemas in {directory} are up to date.")
