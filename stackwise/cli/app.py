"""The `stackwise` Typer application: its name, help and ``--version``.

The commands are added to it by `stackwise.cli`, in the order ``stackwise --help`` lists them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from stackwise._version import __version__

app = typer.Typer(
    name="stackwise",
    help="Declarative, tracked experiments on depth-wise (layer-wise, stack-wise) versus "
    "end-to-end transformer training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
