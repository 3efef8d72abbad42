"""The `stackwise` command line.

    stackwise validate experiments/*.yaml      check files and whole grids; summary or errors
    stackwise plan experiments/quickstart.yaml parameters, FLOPs and memory per run; trains nothing
    stackwise run experiments/*.yaml           validate everything, then train and track each run
    stackwise schema [--check]                 (re)generate the JSON Schemas in schemas/
    stackwise generate RUN_ID --prompt "…"     text from a trained rack (or --runs FILE: a grid)
    stackwise export RUN_ID --format hf DIR    a Hugging Face Llama folder (or safetensors)

The commands are thin: loading, grid expansion and validation live in `stackwise.config`, the
checks before a grid runs (data files, memory, disk, devices, stores) in `stackwise.preflight`,
estimates in `stackwise.training.plan`, running in `stackwise.runner`. Every mistake in user
input is reported as ``file:line: dotted.field: message`` on stderr with exit status 2, before
anything is trained or written. torch and mlflow are imported only inside the commands that
need them, so `stackwise --help` and `stackwise validate` start quickly.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from stackwise import preflight
from stackwise._version import __version__
from stackwise.preflight import Plans

if TYPE_CHECKING:
    from stackwise.config.base import BudgetConfig

app = typer.Typer(
    name="stackwise",
    help="Declarative, tracked experiments on depth-wise (layer-wise, stack-wise) versus "
    "end-to-end transformer training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Exit statuses: 2 for anything wrong in user input (as click does for usage errors).
EXIT_USER_ERROR = 2
EXIT_STALE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


# --------------------------------------------------------------------------------------------
# output helpers (also used by the tracking commands)
# --------------------------------------------------------------------------------------------


def stdout_console() -> Console:
    """Console for results; wide when piped so tables and run names are not folded."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def stderr_console() -> Console:
    """Console for errors and notes; never wraps a message across lines."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def fail(messages: Sequence[str], *, summary: str | None = None) -> NoReturn:
    """Print user-input errors (one line each) and exit with status 2."""
    console = stderr_console()
    for message in messages:
        console.print(Text("error:", style="bold red"), Text(message))
    if summary:
        console.print(Text(summary, style="red"))
    raise typer.Exit(EXIT_USER_ERROR)


def note(message: str) -> None:
    stderr_console().print(Text("note:", style="yellow"), Text(message))


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `ConfigError` raised inside the block into clean messages and exit status 2."""
    from stackwise.config.errors import ConfigError

    try:
        yield
    except ConfigError as error:
        count = len(error.errors)
        fail(
            [e.format() for e in error.errors],
            summary=f"{count} error{'s' if count != 1 else ''}; nothing was run or written.",
        )


def load_plans(
    patterns: Sequence[str],
    overrides: Sequence[str],
    only: Sequence[str],
    max_runs: int | None,
    memory_check: bool,
) -> Plans:
    """`stackwise.preflight.load_plans`, printing its notes (merged duplicate runs)."""
    notes: list[str] = []
    try:
        return preflight.load_plans(patterns, overrides, only, max_runs, memory_check, notes)
    finally:
        for message in notes:
            note(message)


def _count(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; FLOPs and parameter counts stay readable."""
    for size, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        # Round first: 999.6G is shown as 1T, not as "1e+03G".
        if abs(float(f"{n:.3g}")) >= size:
            return f"{n / size:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def _bytes(n: int) -> str:
    from stackwise.training.limits import format_bytes

    return format_bytes(n)


def _runs_of(count: int) -> str:
    return f"{count} run{'s' if count != 1 else ''}"


# --------------------------------------------------------------------------------------------
# options shared by several commands
# --------------------------------------------------------------------------------------------

FilesArgument = Annotated[
    list[str],
    typer.Argument(
        help="Experiment files; glob patterns such as 'experiments/*.yaml' are expanded.",
        metavar="FILES",
        show_default=False,
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a setting in every run, e.g. --set training.budget.steps=50 "
        "(value read as YAML; repeatable).",
        show_default=False,
    ),
]
OnlyOption = Annotated[
    list[str] | None,
    typer.Option(
        "--only",
        metavar="KEY=VALUE",
        help="Keep only runs with this grid coordinate (short or dotted axis name, e.g. "
        "--only mode=layerwise) or resolved setting. Repeat a key for alternatives.",
        show_default=False,
    ),
]
MaxRunsOption = Annotated[
    int | None,
    typer.Option(
        "--max-runs",
        min=1,
        help="Largest grid a file may have, in points before `exclude` (default 10,000); "
        "checked before the grid is expanded.",
        show_default=False,
    ),
]
NoMemoryCheckOption = Annotated[
    bool,
    typer.Option(
        "--no-memory-check",
        help="Accept runs whose estimated peak memory exceeds the memory of their device.",
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stackwise {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Declarative, tracked experiments on depth-wise versus end-to-end transformer training."""


# --------------------------------------------------------------------------------------------
# experiment commands
# --------------------------------------------------------------------------------------------


@app.command()
def validate(
    files: FilesArgument,
    set_: SetOption = None,
    only: OnlyOption = None,
    max_runs: MaxRunsOption = None,
    no_memory_check: NoMemoryCheckOption = False,
) -> None:
    """Check experiment files and every run of their grids (and that each run fits its
    device's memory); print runs per file."""
    with user_errors():
        plans = load_plans(files, set_ or [], only or [], max_runs, not no_memory_check)
    from stackwise.tracking.tables import Column, print_table

    console = stdout_console()
    print_table(
        console,
        [Column("File", key=True), Column("Experiment"), Column("Runs", numeric=True)],
        [[experiment.file, experiment.name, str(len(runs))] for experiment, runs in plans],
        title="Valid experiment files",
    )
    total = sum(len(runs) for _, runs in plans)
    console.print(f"{len(plans)} file{'s' if len(plans) != 1 else ''} valid, {_runs_of(total)}.")


@app.command()
def plan(
    files: FilesArgument,
    set_: SetOption = None,
    only: OnlyOption = None,
    max_runs: MaxRunsOption = None,
    no_memory_check: NoMemoryCheckOption = False,
) -> None:
    """Estimate each run (parameters, FLOPs, memory, device); trains nothing.

    For every run: total parameters, trainable parameters and optimizer steps per training
    stage, estimated training FLOPs (with the activation cache), estimated peak memory and the device.
    """
    with user_errors():
        plans = load_plans(files, set_ or [], only or [], max_runs, not no_memory_check)
        preflight.check_devices(plans)
    from stackwise.tracking.tables import Column, print_table
    from stackwise.training.plan import estimate_run

    columns = [Column("Experiment", key=True), Column("Run", key=True)]
    columns += [Column("Params", numeric=True), Column("Trainable per stage")]
    columns += [Column("Steps per stage"), Column("Train FLOPs", numeric=True)]
    columns += [Column("Training memory", numeric=True), Column("Cache RAM / disk")]
    columns += [Column("Peak memory", numeric=True), Column("Device")]
    rows: list[list[str]] = []
    notes: list[str] = []
    total_flops = 0.0
    estimates: dict[str, Any] = {}
    for experiment, runs in plans:
        for run in runs:
            # estimate_run never raises: what it cannot estimate comes back as a note. Seeds and
            # learning rates do not change an estimate: each is made once.
            key = preflight.estimate_key(run.config)
            if key not in estimates:
                estimates[key] = estimate_run(run.config)
            estimate = estimates[key]
            total_flops += estimate.flops
            missing = "-" if estimate.note else ""
            rows.append(
                [
                    experiment.name,
                    run.name,
                    _count(estimate.total_parameters),
                    _stage_summary([s.trainable_parameters for s in estimate.stages]) or missing,
                    _stage_summary([s.steps for s in estimate.stages], _plain) or missing,
                    _count(estimate.flops) if not estimate.note else missing,
                    _bytes(estimate.training_memory_bytes) if not estimate.note else missing,
                    f"{_bytes(estimate.cache_memory_bytes)} / {_bytes(estimate.cache_disk_bytes)}"
                    if not estimate.note
                    else missing,
                    ("≥ " if estimate.note else "") + _bytes(estimate.peak_memory_bytes),
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
    console.print(f"{_runs_of(count)}, {_count(total_flops)} training FLOPs in total.")


def _plain(n: int) -> str:
    return str(n)


def _stage_summary(trainable: Sequence[int], show: Callable[[int], str] = _count) -> str:
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


@app.command()
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
        plans = load_plans(files, set_ or [], only or [], max_runs, not no_memory_check)
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
        if chosen is not None and hasattr(chosen, "connect"):
            chosen.connect()  # before anything is written: a cluster that cannot be reached
    except ExecutorError as error:
        fail([str(error)], summary="nothing was run or written.")
    from stackwise.runner import RunOptions, run_experiments

    options = RunOptions(
        tracking_uri=tracking_uri, force=force, quiet=quiet, threads=threads, executor=chosen
    )
    try:
        if under_torchrun():
            from stackwise.executors.torchrun import LockstepBroken, run_grid_on_ranks

            try:
                ranked = run_grid_on_ranks(plans, options)
            except LockstepBroken as error:
                stderr_console().print(
                    Text(
                        f"error: a point failed on rank 0 ({error}); this torchrun launch "
                        "stops here. Run the same command again to go on with the others.",
                        style="red",
                    )
                )
                raise typer.Exit(1) from None
            if ranked is None:  # a rank other than 0: rank 0 reports
                raise typer.Exit(0)
            summary = ranked
        else:
            summary = run_experiments(plans, options)
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
    finally:
        if chosen is not None and hasattr(chosen, "close"):
            chosen.close()
    raise typer.Exit(summary.exit_code)


def _budget(budget: BudgetConfig) -> str:
    if budget.steps is not None:
        return f"{budget.steps} steps"
    if budget.tokens is not None:
        return f"{_count(budget.tokens)} tokens"
    return f"{_count(budget.flops or 0)} FLOPs"


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
    console.print(f"{_runs_of(sum(len(runs) for _, runs in plans))} in {files}.")


@app.command()
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


# --------------------------------------------------------------------------------------------
# tracking commands (compare, ui) follow this line
# --------------------------------------------------------------------------------------------


TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, then ./mlruns).",
        show_default=False,
    ),
]


@app.command()
def compare(
    experiments: Annotated[
        list[str],
        typer.Argument(
            help="Experiment files (globs allowed) or MLflow experiment names.",
            show_default=False,
        ),
    ],
    format_: Annotated[
        str,
        typer.Option("--format", help="table, csv, markdown, json or parquet (needs --output)."),
    ] = "table",
    pivot: Annotated[
        str | None,
        typer.Option(
            "--pivot",
            help="Two columns as rows x columns, e.g. 'size x mode' or size,mode; cells show "
            "--metric.",
            show_default=False,
        ),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            "--metric",
            help="Value of --pivot cells, added as a column if it is another MLflow metric "
            "(default: val_loss; also perplexity, flops, tokens_seen, unique_tokens, "
            "tokens_per_s, peak_memory_mb, wall_time_s, parameters).",
            show_default=False,
        ),
    ] = None,
    agg: Annotated[
        str | None,
        typer.Option(
            "--agg",
            help="Combine several runs in one --pivot cell: mean, min, max, std, sem, count or "
            "last (the latest started). Without it such a cell is an error naming what differs "
            "inside it (replicate seeds show as mean ± std (n) without it).",
            show_default=False,
        ),
    ] = None,
    all_runs: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Every run, not only the latest of each grid point's current settings: with "
            "start time, config hash, and the params that differ between runs of a grid point; "
            "every seed and every tuned value, not aggregated.",
        ),
    ] = False,
    frontier: Annotated[
        bool,
        typer.Option(
            "--frontier",
            help="Per mode and budget (a training.budget.flops axis) the tuned, seed-averaged "
            "test loss, a fit L(C) = E + A*C^-alpha per mode, and each mode against rackwise "
            "on the same seeds: loss gap, compute multiplier and crossover with 95% intervals.",
        ),
    ] = False,
    columns: Annotated[
        str | None,
        typer.Option(
            "--columns",
            help="Only these columns, in this order (comma-separated, e.g. "
            "run,val_loss,flops,unique_tokens); the run name always stays first.",
            show_default=False,
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="DIR",
            help="Also write the comparison plots (PNG, as on the parent run) into DIR.",
            show_default=False,
        ),
    ] = None,
    set_: SetOption = None,
    only: OnlyOption = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write to this file instead of stdout."),
    ] = None,
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Compare the runs of experiments: per grid point the latest run of the file's current
    settings (with --set/--only as given to `run`), results side by side; --all for every run."""
    from mlflow.exceptions import MlflowException

    from stackwise.tracking.compare import (
        AGGREGATIONS,
        FORMATS,
        CompareError,
        compare_runs,
        render,
        save_plots,
        select_columns,
    )
    from stackwise.tracking.evidence import EvidenceError, comparison_table

    if format_ not in FORMATS:
        fail([f"--format: unknown format {format_!r}; use one of {', '.join(FORMATS)}"])
    if format_ == "parquet" and output is None:
        fail(["--format parquet writes a binary file: give --output PATH"])
    if agg is not None and agg not in AGGREGATIONS:
        fail([f"--agg: unknown aggregation {agg!r}; use one of {', '.join(AGGREGATIONS)}"])
    if agg is not None and pivot is None:
        fail(["--agg combines the runs of a --pivot cell: give --pivot too"])
    if frontier and (pivot is not None or all_runs or columns is not None):
        fail(["--frontier prints its own tables: leave out --pivot, --all and --columns"])
    if plot is not None and plot.exists() and not plot.is_dir():
        fail([f"--plot {plot}: not a folder"])
    with user_errors():
        items = preflight.expand_paths(experiments)
    notes: list[str] = []
    clients: dict[str, Any] = {}
    try:
        with user_errors():
            frame = compare_runs(
                items,
                tracking_uri=tracking_uri,
                metric=metric,
                notes=notes,
                overrides=set_ or (),
                only=only or (),
                all_runs=all_runs,
                clients=clients,
            )
        if frontier:
            _print_frontier(frame, format_, output, plot)
            return
        table, view_notes = comparison_table(frame, format_, pivot, metric, agg, all_runs)
        for message in [*notes, *view_notes]:
            note(message)
        if columns is not None:
            table = select_columns(table, columns)
        if plot is not None:
            try:
                written = save_plots(clients, frame, plot)
            except OSError as error:
                fail([f"--plot {plot}: {error.strerror or error}"])
            for path in written:
                stderr_console().print(f"wrote {path}")
        frame = table
        title = ", ".join(experiments) if format_ == "table" else None
        text = render(frame, format_, output=output, console=stdout_console(), title=title)
    except (CompareError, EvidenceError) as error:
        fail([str(error)])
    except MlflowException as error:  # a store that exists but cannot be read as asked
        fail([f"tracking store: {error.message}"])
    except OSError as error:
        fail([f"--output {output}: {error.strerror or error}"])
    if output is not None:
        stderr_console().print(f"wrote {output}")
    elif text is not None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _print_frontier(frame: Any, format_: str, output: Path | None, plot: Path | None) -> None:
    """`compare --frontier`: the tables of `stackwise.tracking.evidence.frontier_tables`."""
    import json

    from stackwise.analysis import epoch_warnings
    from stackwise.tracking.compare import render
    from stackwise.tracking.evidence import frontier_analysis, frontier_plot, frontier_tables

    analysis = frontier_analysis(frame)
    tables = frontier_tables(analysis, frame)
    messages = [*analysis.notes, *epoch_warnings(frame, "epochs", 4.0, "run")]
    if plot is not None:
        plot.mkdir(parents=True, exist_ok=True)
        written = frontier_plot(analysis, frame, plot / "frontier.png")
        stderr_console().print(f"wrote {written}")
    text: str | None
    if format_ == "json":
        payload = {name: table.to_dicts() for name, table in tables.items()}
        payload["notes"] = messages  # type: ignore[assignment]
        text = json.dumps(payload, indent=2, default=str) + "\n"
    elif format_ in ("table", "markdown"):
        parts = []
        for name, table in tables.items():
            if format_ == "table" and output is None:
                render(table, "table", console=stdout_console(), title=f"frontier: {name}")
            else:
                parts.append(f"### {name}\n\n" + str(render(table, "markdown")))
        for message in messages:
            note(message)
        text = "\n".join(parts) if parts else None
    else:
        fail([f"--frontier prints table, markdown or json, not {format_}"])
    if output is not None and text is not None:
        output.write_text(text, encoding="utf-8")
        stderr_console().print(f"wrote {output}")
    elif text is not None:
        sys.stdout.write(text)


@app.command()
def report(
    experiment: Annotated[
        Path,
        typer.Argument(help="The experiment file (with `tune:` and `seeds:`).", show_default=False),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the report here (markdown; its frontier plot goes beside it as "
            "<name>_frontier.png). Default: print it.",
            show_default=False,
        ),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=100, help="Bootstrap resamples of the seeds.")
    ] = 2000,
    set_: SetOption = None,
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Write the evidence report of an experiment: its design, the tuned, seed-averaged results,
    paired differences with 95% intervals, the compute frontier and conclusions drawn from the
    intervals by rule. Also logged on the experiment's latest parent run (report.md)."""
    from mlflow.exceptions import MlflowException

    from stackwise.tracking.compare import CompareError, compare_runs
    from stackwise.tracking.evidence import EvidenceError, build_report, log_report, runs_commit

    if not experiment.is_file():
        fail([f"{experiment}: no such experiment file"])
    if output is not None and output.exists() and output.is_dir():
        fail([f"--output {output}: a folder; give a file name such as report.md"])
    notes: list[str] = []
    clients: dict[str, Any] = {}
    try:
        with user_errors():
            frame = compare_runs(
                [str(experiment)],
                tracking_uri=tracking_uri,
                notes=notes,
                overrides=set_ or (),
                clients=clients,
            )
        for message in notes:
            note(message)
        with tempfile.TemporaryDirectory(prefix="stackwise-report-") as scratch:
            folder = output.parent if output is not None else Path(scratch)
            stem = output.stem if output is not None else "report"
            folder.mkdir(parents=True, exist_ok=True)
            command = f"stackwise run {experiment} --jobs 2 && stackwise report {experiment}" + (
                f" -o {output}" if output is not None else ""
            )
            text, plot = build_report(
                frame,
                experiment,
                folder / f"{stem}_frontier.png",
                n_boot=bootstrap,
                commit=runs_commit(clients, frame),
                command=command,
            )
            logged = log_report(clients, frame, text, plot)
            if output is not None:
                output.write_text(text, encoding="utf-8")
    except (CompareError, EvidenceError) as error:
        fail([str(error)])
    except MlflowException as error:
        fail([f"tracking store: {error.message}"])
    except OSError as error:
        fail([f"--output {output}: {error.strerror or error}"])
    if logged is not None:
        stderr_console().print(f"logged report.md on run {logged}")
    if output is not None:
        stderr_console().print(f"wrote {output}" + (f" and {plot}" if plot is not None else ""))
    else:
        sys.stdout.write(text)


@app.command()
def ui(
    tracking_uri: TrackingUriOption = None,
    host: Annotated[
        str, typer.Option("--host", help="Interface to bind (loopback unless you need more).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", help="Port to listen on (0: any free port).")
    ] = 5000,
) -> None:
    """Start the MLflow UI on the project's tracking store; print its URL once it answers."""
    from stackwise.tracking.store import check_tracking_uri, resolve_tracking_uri
    from stackwise.tracking.ui import bind_problem, launch_ui

    # Host and port first: a typo there must not wait for a store check.
    problem = bind_problem(host, port)
    if problem is not None:
        fail([problem])
    uri = resolve_tracking_uri(tracking_uri)
    problem = check_tracking_uri(uri)
    if problem is not None:
        fail([problem])
    code = launch_ui(uri, host, port, console=stdout_console())
    raise typer.Exit(code)


# --------------------------------------------------------------------------------------------
# using trained racks: generate, export
# --------------------------------------------------------------------------------------------


def _load_trained(source: str, tracking_uri: str | None) -> Any:
    """`load_trained` of a run id or folder; every way it can fail is one line, exit 2."""
    from mlflow.exceptions import MlflowException

    from stackwise.tracking.models import TrainedModelError, load_trained
    from stackwise.tracking.store import check_tracking_uri, resolve_tracking_uri, sqlite_path

    if Path(source).is_dir():
        try:
            return load_trained(source)
        except (TrainedModelError, OSError, ValueError) as error:
            fail([str(error)])
    uri = resolve_tracking_uri(tracking_uri)
    database = sqlite_path(uri)
    if database is not None and not database.exists():
        fail(
            [f"{source}: not a folder, and there is no tracking store at {database} to find it in"]
        )
    problem = check_tracking_uri(uri)
    if problem is not None:
        fail([problem])
    try:
        return load_trained(source, tracking_uri=uri)
    except TrainedModelError as error:
        fail([str(error)])
    except MlflowException as error:
        fail([f"{source}: not a folder, and not a run of {uri} ({error.message.splitlines()[0]})"])


@app.command()
def generate(
    source: Annotated[
        str | None,
        typer.Argument(
            help="Run id, or a folder written by `stackwise export --format safetensors`.",
            show_default=False,
        ),
    ] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=0, help="Tokens to generate at most.")
    ] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 is greedy.")
    ] = 1.0,
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k", min=1, help="Sample among the k likeliest tokens only.", show_default=False
        ),
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(
            "--top-p",
            min=0.0,
            max=1.0,
            help="Sample within the smallest set of likeliest tokens whose probability reaches p.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling draws.")] = 0,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            min=1,
            help="Unmasking steps for racks trained with mlm/diffusion (default: one per token).",
            show_default=False,
        ),
    ] = None,
    no_cache: Annotated[
        bool,
        typer.Option("--no-cache", help="Recompute the whole sequence every step (no KV cache)."),
    ] = False,
    runs: Annotated[
        Path | None,
        typer.Option(
            "--runs",
            metavar="FILE",
            help="Generate from every finished grid point of this experiment file (its current "
            "runs, as `stackwise compare FILE` shows them), side by side.",
            show_default=False,
        ),
    ] = None,
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Generate text with a trained rack, with the sampler of its training objective."""
    from stackwise.tracking.generate import (
        GenerateOptions,
        generate_for_grid,
        generate_text,
        printable,
    )

    if (source is None) == (runs is None):
        fail(["give a run id or folder, or --runs FILE (one of them)"])
    if top_p == 0.0:
        fail(["--top-p: must be above 0 (1 keeps every token)"])
    options = GenerateOptions(
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        steps=steps,
        use_cache=not no_cache,
    )
    console = stdout_console()
    if source is not None:
        result = generate_text(_load_trained(source, tracking_uri), options)
        generation = result.generation
        console.print(Text(f"{result.model.name} · {result.sampler_line}", style="bold"))
        console.print(
            Text(printable(result.prompt), style="dim") + Text(printable(result.completion))
        )
        console.print(
            f"{generation.new_tokens} tokens in {generation.seconds:.2f} s "
            f"({generation.tokens_per_s:.1f} tokens/s)"
        )
        return
    assert runs is not None
    from mlflow.exceptions import MlflowException

    from stackwise.tracking.compare import CompareError
    from stackwise.tracking.models import TrainedModelError

    notes: list[str] = []
    try:
        with user_errors():
            results = generate_for_grid(str(runs), options, tracking_uri=tracking_uri, notes=notes)
    except (CompareError, TrainedModelError) as error:
        fail([str(error)])
    except MlflowException as error:
        fail([f"tracking store: {error.message}"])
    for message in notes:
        note(message)
    if not results:
        fail([f"{runs}: no grid point has a finished run to generate from"])
    for item in results:
        row, result = item.row, item.result
        loss = row.get("val_loss")
        header = f"{row['run']} · val_loss {loss:.4f}" if loss is not None else row["run"]
        console.print(Text(f"── {header} · {result.sampler_line}", style="bold"))
        console.print(
            Text(printable(result.prompt), style="dim") + Text(printable(result.completion))
        )
        console.print(f"   {result.generation.tokens_per_s:.1f} tokens/s")
    console.print(
        f"{len(results)} run{'s' if len(results) != 1 else ''}, prompt {prompt!r}, seed {seed}."
    )


@app.command()
def export(
    source: Annotated[
        str,
        typer.Argument(
            help="Run id, or a folder written by --format safetensors.", show_default=False
        ),
    ],
    out_dir: Annotated[
        Path, typer.Argument(help="New (or empty) folder to write.", show_default=False)
    ],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="hf: a Hugging Face LlamaForCausalLM folder (Llama-compatible causal racks; "
            "needs stackwise\\[hf]); safetensors: weights, spec and config for load_rack.",
            show_default=False,
        ),
    ],
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Export a trained rack as a Hugging Face Llama folder or as StackWise safetensors."""
    from stackwise.tracking.export import EXPORT_FORMATS, ExportError, export, hf_incompatibility

    if format_ not in EXPORT_FORMATS:
        fail([f"--format: unknown format {format_!r}; use one of {', '.join(EXPORT_FORMATS)}"])
    model = _load_trained(source, tracking_uri)
    if format_ == "hf":
        problem = hf_incompatibility(model.rack)
        if problem is not None:
            fail([f"{model.name}: cannot export as a Hugging Face Llama: {problem}"])
    try:
        written = export(model, out_dir, format_)
    except ExportError as error:
        fail([str(error)])
    except OSError as error:
        fail([f"{out_dir}: {error.strerror or error}"])
    names = ", ".join(path.name for path in written)
    stdout_console().print(f"wrote {out_dir}: {names}")


def main() -> None:
    """Console-script entry point (`stackwise`)."""
    app()


if __name__ == "__main__":
    main()
