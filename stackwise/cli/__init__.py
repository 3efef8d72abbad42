"""The `stackwise` command line.

    stackwise validate experiments/*.yaml      check files and whole grids; summary or errors
    stackwise plan experiments/quickstart.yaml parameters, FLOPs and memory per run; trains nothing
    stackwise run experiments/*.yaml           validate everything, then train and track each run
    stackwise schema [--check]                 (re)generate the JSON Schemas in schemas/
    stackwise generate RUN_ID --prompt "…"     text from a trained rack (or --runs FILE: a grid)
    stackwise export RUN_ID --format hf DIR    a Hugging Face Llama folder (or safetensors)
    stackwise data prepare CONFIG -o DIR       tokenize a corpus once into memory-mapped shards

The commands are thin: loading, grid expansion and validation live in `stackwise.config`, the
checks before a grid runs (data files, memory, disk, devices, stores) in `stackwise.preflight`,
estimates in `stackwise.training.plan`, running in `stackwise.runner`. Every mistake in user
input is reported as ``file:line: dotted.field: message`` on stderr with exit status 2, before
anything is trained or written. torch and mlflow are imported only inside the commands that
need them, so `stackwise --help` and `stackwise validate` start quickly.

The package's parts: `app` (the Typer application and ``--version``), `output` (consoles,
user errors, notes, number formats), `options` (arguments and options several commands share),
and the commands: `experiments` (validate, plan, schema), `running` (run), `results` (compare,
report, ui), `racks` (generate, export) and `data` (data prepare).
"""

from __future__ import annotations

import os

from stackwise.cli.app import app
from stackwise.cli.data import data_app
from stackwise.cli.examples import examples, init
from stackwise.cli.experiments import plan, schema, validate
from stackwise.cli.options import (
    FilesArgument,
    MaxRunsOption,
    NoMemoryCheckOption,
    OnlyOption,
    SetOption,
    TrackingUriOption,
)
from stackwise.cli.output import (
    EXIT_INTERRUPTED,
    EXIT_STALE,
    EXIT_USER_ERROR,
    fail,
    load_plans,
    note,
    stderr_console,
    stdout_console,
    user_errors,
)
from stackwise.cli.racks import export, generate
from stackwise.cli.results import compare, report, ui
from stackwise.cli.running import run

# The commands, in the order `stackwise --help` lists them.
for _command in (
    validate,
    plan,
    run,
    schema,
    compare,
    report,
    ui,
    generate,
    export,
    examples,
    init,
):
    app.command()(_command)
app.add_typer(data_app)


def main() -> None:
    """Console-script entry point (`stackwise`). MLflow's own INFO lines (creating a store's
    tables, …) are left out unless ``MLFLOW_LOGGING_LEVEL`` asks for them."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    app()


__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_STALE",
    "EXIT_USER_ERROR",
    "FilesArgument",
    "MaxRunsOption",
    "NoMemoryCheckOption",
    "OnlyOption",
    "SetOption",
    "TrackingUriOption",
    "app",
    "compare",
    "export",
    "fail",
    "generate",
    "load_plans",
    "main",
    "note",
    "plan",
    "report",
    "run",
    "schema",
    "stderr_console",
    "stdout_console",
    "ui",
    "user_errors",
    "validate",
]
