"""Arguments and options that several commands share, as `typing.Annotated` types."""

from __future__ import annotations

from typing import Annotated

import typer

from stackwise.preflight import MAX_EPOCHS

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
StrictOption = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Treat warnings about the data as errors: a budget that goes over its training "
        f"data more than {MAX_EPOCHS} times (epochs) stops the command before anything runs.",
    ),
]


TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, then ./mlruns).",
        show_default=False,
    ),
]
