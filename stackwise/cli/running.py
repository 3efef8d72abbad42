"""`stackwise run`: validate every file and grid, check devices and stores, then train each run
where the flags say (`stackwise.executors`) and track it (`stackwise.runner`).

``--dry-run`` lists the runs that would train instead; Ctrl-C, SIGTERM and SIGHUP end the
command with exit status 128 + signal, the run in progress marked KILLED; a tracking server
that stops answering for longer than ``tracking.server_wait_minutes`` ends it with one line
and exit status 75 (`stackwise.tracking.store.TrackingUnavailable`).
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Annotated

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
    EXIT_INTERRUPTED,
    fail,
    human_count,
    load_plans,
    runs_of,
    stderr_console,
    stdout_console,
    user_errors,
)
from stackwise.preflight import Plans
from stackwise.tracking.store import (
    EXIT_TRACKING_UNAVAILABLE,
    TrackingUnavailable,
    is_lock_error,
)

if TYPE_CHECKING:
    from stackwise.config.base import BudgetConfig


def run(
    files: FilesArgument,
    set_: SetOption = None,
    only: OnlyOption = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the runs that would train; train and write nothing."),
    ] = False,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, then tracking.uri, then "
            "./mlruns).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rerun runs that already finished (same config hash).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only the final summary.")] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads per training process (default: torch's choice). 1 is fastest for "
            "tiny models or on a busy machine; not part of a run's identity.",
            show_default=False,
        ),
    ] = None,
    max_runs: MaxRunsOption = None,
    no_memory_check: NoMemoryCheckOption = False,
    strict: StrictOption = False,
    executor: Annotated[
        str,
        typer.Option(
            "--executor",
            help="Where grid points train: local (this machine) or ray (a Ray cluster; needs "
            "pip install 'stackwise\\[ray]').",
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Ray cluster to join (auto, ray://head:10001); default: a local cluster "
            "started for this run.",
            show_default=False,
        ),
    ] = None,
    cpus_per_run: Annotated[
        float | None,
        typer.Option(
            "--cpus-per-run", min=0.0, help="CPUs of a Ray task (default 1).", show_default=False
        ),
    ] = None,
    gpus_per_run: Annotated[
        float | None,
        typer.Option(
            "--gpus-per-run",
            min=0.0,
            help="GPUs of a Ray task (default: 1 when the cluster has GPUs, else 0).",
            show_default=False,
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            min=1,
            help="Points trained at once on this machine: one GPU each where GPUs exist, else "
            "the CPU cores split between them.",
        ),
    ] = 1,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Processes per point (torchrun, data parallel: gloo on CPU, nccl on GPUs); "
            "training.batch_size must divide by it.",
        ),
    ] = 1,
) -> None:
    """Validate every file and grid first, then train and track each run."""
    with user_errors():
        plans = load_plans(files, set_ or [], only or [], max_runs, not no_memory_check, strict)
    if dry_run:
        _print_runs(plans)
        stdout_console().print("Dry run: nothing was trained or written.")
        return
    from stackwise.executors import ExecutorError, choose_executor, under_torchrun

    try:
        with user_errors():
            chosen = choose_executor(
                plans,
                executor,
                address=address,
                cpus_per_run=cpus_per_run,
                gpus_per_run=gpus_per_run,
                jobs=jobs,
                nproc=nproc,
            )
            if address is None:  # a remote cluster's devices are its workers'
                preflight.check_devices(plans)
            preflight.check_stores(plans, tracking_uri)
    except ExecutorError as error:
        fail([str(error)], summary="nothing was run or written.")
    from stackwise.runner import RunOptions, run_experiments, signals_as_interrupts

    options = RunOptions(
        tracking_uri=tracking_uri, force=force, quiet=quiet, threads=threads, executor=chosen
    )
    try:
        # From the start of a cluster to its shutdown, SIGTERM and SIGHUP stop as Ctrl-C does.
        with signals_as_interrupts():
            try:
                if chosen is not None and hasattr(chosen, "connect"):
                    try:
                        chosen.connect()  # before anything is written: a cluster out of reach
                    except ExecutorError as error:
                        fail([str(error)], summary="nothing was run or written.")
                if under_torchrun():
                    from stackwise.executors.torchrun import LockstepBroken, run_grid_on_ranks

                    try:
                        ranked = run_grid_on_ranks(plans, options)
                    except LockstepBroken as error:
                        stderr_console().print(
                            Text(
                                f"error: a point failed on rank 0 ({error}); this torchrun "
                                "launch stops here. Run the same command again to go on with "
                                "the others.",
                                style="red",
                            )
                        )
                        raise typer.Exit(1) from None
                    if ranked is None:  # a rank other than 0: rank 0 reports
                        raise typer.Exit(0)
                    summary = ranked
                else:
                    summary = run_experiments(plans, options)
            finally:
                if chosen is not None and hasattr(chosen, "close"):
                    chosen.close()
    except TrackingUnavailable as stop:
        # One line: what stopped, what was kept, and how to go on (exit 75, EX_TEMPFAIL).
        stderr_console().print(
            Text("error:", style="bold red"),
            Text(f"{stop}; run the same command again once the server answers to resume."),
        )
        raise typer.Exit(EXIT_TRACKING_UNAVAILABLE) from None
    except KeyboardInterrupt as error:
        # Ctrl-C, or SIGTERM/SIGHUP turned into the same by the runner: exit 128 + signal.
        signum = getattr(error, "signum", None)
        stderr_console().print(
            Text(
                f"{'interrupted' if signum is None else signal.Signals(signum).name}: the run "
                "in progress is marked KILLED (with a checkpoint where one was written); run "
                "the same command again to resume it.",
                style="yellow",
            )
        )
        raise typer.Exit(EXIT_INTERRUPTED if signum is None else 128 + signum) from None
    except Exception as error:
        if not is_lock_error(error):
            raise
        # SQLite allows one writer at a time; another process kept the store through every retry.
        stderr_console().print(
            Text("error:", style="bold red"),
            Text(
                "the tracking store stayed locked by another process through every retry "
                "(database is locked); run the same command again once it is free (finished "
                "points are skipped, the others resume)."
            ),
        )
        raise typer.Exit(1) from None
    raise typer.Exit(summary.exit_code)


def _budget(budget: BudgetConfig) -> str:
    if budget.steps is not None:
        return f"{budget.steps} steps"
    if budget.tokens is not None:
        return f"{human_count(budget.tokens)} tokens"
    return f"{human_count(budget.flops or 0)} FLOPs"


def _print_runs(plans: Plans) -> None:
    from stackwise.tracking.tables import Column, print_table

    columns = [Column("Experiment", key=True), Column("Run", key=True), Column("Config hash")]
    columns += [Column(name) for name in ("Mode", "Objective", "Stacks x blocks")]
    columns += [Column("d_model", numeric=True), Column("Budget", numeric=True)]
    rows: list[list[str]] = []
    for experiment, runs in plans:
        for spec in runs:
            model, training = spec.config.model, spec.config.training
            blocks = [s.n_blocks for s in model.resolved_stacks()]
            shape = (
                f"{len(blocks)} x {blocks[0]}"
                if len(set(blocks)) == 1
                else " + ".join(map(str, blocks))
            )
            rows.append(
                [
                    experiment.name,
                    spec.name,
                    spec.config_hash,
                    training.mode_label,  # the user's word: layerwise stays layerwise
                    training.objective,
                    shape,
                    str(model.d_model),
                    _budget(training.budget),
                ]
            )
    console = stdout_console()
    print_table(console, columns, rows, title="Runs")
    files = f"{len(plans)} file{'s' if len(plans) != 1 else ''}"
    console.print(f"{runs_of(sum(len(runs) for _, runs in plans))} in {files}.")
