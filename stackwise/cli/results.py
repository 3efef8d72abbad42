"""Commands that read what the runs recorded: `compare`, `report` and `ui`.

`compare` puts the runs of experiments side by side (`stackwise.tracking.compare`; with
``--frontier`` the tables of `stackwise.tracking.evidence`), `report` writes an experiment's
evidence report, `ui` starts the MLflow UI on the tracking store.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from stackwise import preflight
from stackwise.cli.options import OnlyOption, SetOption, TrackingUriOption
from stackwise.cli.output import fail, note, stderr_console, stdout_console, user_errors


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
            "run,val_loss,flops,unique_tokens; the run name always stays first), or 'all'. "
            "Default in a table: the coordinates that vary, val_loss, test_loss, flops, "
            "training_memory_mb and wall_time_s.",
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
    from stackwise.tracking.compare import (
        AGGREGATIONS,
        FORMATS,
        CompareError,
        compare_runs,
        headline_frame,
        parse_pivot,
        render,
        resolve_metric,
        save_plots,
        select_columns,
    )
    from stackwise.tracking.compare.common import store_error
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
        if columns is not None and columns.strip() != "all":
            table = select_columns(table, columns)
        elif columns is None and format_ == "table" and pivot is None:
            table = headline_frame(table)
        if plot is not None:
            try:
                written = save_plots(clients, frame, plot)
            except OSError as error:
                fail([f"--plot {plot}: {error.strerror or error}"])
            for path in written:
                stderr_console().print(f"wrote {path}")
        frame = table
        title = None
        if format_ == "table":
            title = ", ".join(experiments)
            if pivot is not None:
                rows, across = parse_pivot(pivot)
                title += f": {resolve_metric(metric)} ({rows} x {across})"
        text = render(
            frame, format_, output=output, console=stdout_console(), title=title, short=True
        )
    except (CompareError, EvidenceError) as error:
        fail([str(error)])
    except OSError as error:
        fail([f"--output {output}: {error.strerror or error}"])
    except Exception as error:  # a store that exists but cannot be read as asked
        problem = store_error(error)
        if problem is None:
            raise
        fail([f"tracking store: {problem}"])
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
    from stackwise.tracking.compare import CompareError, compare_runs
    from stackwise.tracking.compare.common import store_error
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
                writable=True,  # the report is logged on the runs' parent
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
    except OSError as error:
        fail([f"--output {output}: {error.strerror or error}"])
    except Exception as error:  # a store that exists but cannot be read as asked
        problem = store_error(error)
        if problem is None:
            raise
        fail([f"tracking store: {problem}"])
    if logged is not None:
        stderr_console().print(f"logged report.md on run {logged}")
    if output is not None:
        stderr_console().print(f"wrote {output}" + (f" and {plot}" if plot is not None else ""))
    else:
        sys.stdout.write(text)


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
