"""Commands that start an experiment from the shipped examples: `examples` lists them, `init`
copies one into a new experiment file (`stackwise.config.examples`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from stackwise.cli.output import stdout_console, user_errors


def examples() -> None:
    """List the example experiment files that ship with StackWise (start one with `init`)."""
    from stackwise.config.examples import examples as shipped
    from stackwise.tracking.tables import Column, print_table

    console = stdout_console()
    print_table(
        console,
        [Column("Example", key=True), Column("What it compares")],
        [[example.name, example.description] for example in shipped().values()],
        title="Examples",
    )
    console.print(
        Text("Start from one: stackwise init NAME --from EXAMPLE (writes experiments/NAME.yaml)")
    )


def init(
    name: Annotated[
        str, typer.Argument(help="Name of the new experiment (and of its file).")
    ] = "my_experiment",
    from_: Annotated[
        str,
        typer.Option("--from", help="The example to start from (see `stackwise examples`)."),
    ] = "quickstart",
    directory: Annotated[Path, typer.Option("--dir", help="Folder the file is written to.")] = Path(
        "experiments"
    ),
) -> None:
    """Write a new experiment file from an example: DIR/NAME.yaml, ready to validate and run."""
    from stackwise.config.examples import write_example

    with user_errors():
        path = write_example(from_, directory / f"{name}.yaml", name)
    console = stdout_console()
    console.print(Text(f"wrote {path} (from the example {from_})"))
    console.print(Text(f"next: stackwise validate {path} && stackwise run {path}"))
