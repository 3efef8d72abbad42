"""What the commands print, and how a mistake in user input ends a command.

Results go to stdout (`stdout_console`), errors and notes to stderr (`stderr_console`). Every
mistake in user input is one ``error:`` line per problem and exit status 2 (`fail`); a
`ConfigError` raised inside `user_errors` becomes exactly that.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

from stackwise import preflight
from stackwise.preflight import Plans

# Exit statuses: 2 for anything wrong in user input (as click does for usage errors).
EXIT_USER_ERROR = 2
EXIT_STALE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


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
    """Print a note for the user (one line, on stderr); the command goes on."""
    stderr_console().print(Text("note:", style="yellow"), Text(message))


def warn(message: str) -> None:
    """Print a warning (one line, on stderr): likely a mistake, but the command goes on."""
    stderr_console().print(Text("warning:", style="bold yellow"), Text(message))


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
    strict: bool = False,
) -> Plans:
    """`stackwise.preflight.load_plans`, printing its notes (merged duplicate runs) and its
    warnings (data repeated more than `stackwise.preflight.MAX_EPOCHS` times; errors with
    `strict`)."""
    from stackwise.config.errors import ConfigError

    notes: list[str] = []
    warnings: list[ConfigError] = []
    try:
        return preflight.load_plans(
            patterns, overrides, only, max_runs, memory_check, notes, strict, warnings
        )
    finally:
        for message in notes:
            note(message)
        for warning in warnings:
            warn(warning.format())


def human_count(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; FLOPs and parameter counts stay readable."""
    for size, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        # Round first: 999.6G is shown as 1T, not as "1e+03G".
        if abs(float(f"{n:.3g}")) >= size:
            return f"{n / size:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def human_bytes(n: int) -> str:
    """`stackwise.training.limits.format_bytes`, imported only when a size is shown."""
    from stackwise.training.limits import format_bytes

    return format_bytes(n)


def runs_of(count: int) -> str:
    """'1 run', '3 runs'."""
    return f"{count} run{'s' if count != 1 else ''}"
