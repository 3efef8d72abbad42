"""The example experiment files that ship with the package (`stackwise examples`, `stackwise
init`): the files of the repository's ``experiments/`` folder, installed as
``stackwise/examples/``.

`write_example` copies one into a new file under a new experiment name, comments and all, so a
user starts from a file that validates and runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from stackwise.config.errors import ConfigError, suggest

_NAME_LINE = re.compile(r"^name:[^\S\n]*(\S+)", re.MULTILINE)
_EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Example:
    """One shipped experiment file."""

    name: str  # the file's stem: what `--from` takes
    description: str  # its `description:` field
    text: str


def examples() -> dict[str, Example]:
    """Every shipped example by name, in name order."""
    folder = resources.files("stackwise") / "examples"
    found: dict[str, Example] = {}
    for entry in sorted(folder.iterdir(), key=lambda item: item.name):
        if not entry.name.endswith(".yaml"):
            continue
        text = entry.read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        name = entry.name.removesuffix(".yaml")
        found[name] = Example(name, str(data.get("description", "")), text)
    return found


def write_example(source: str, destination: Path, name: str) -> Path:
    """Write example `source` to `destination` as experiment `name` (its ``name:`` line
    replaced). Raises `ConfigError` for an unknown example, a name MLflow cannot take, or a
    destination that exists (nothing is overwritten)."""
    known = examples()
    if source not in known:
        close = suggest(source, list(known))
        hint = f"did you mean '{close}'? " if close else ""
        raise ConfigError(
            f"no example '{source}'; {hint}examples: {', '.join(known)}", field="--from"
        )
    if not _EXPERIMENT_NAME.match(name):
        raise ConfigError(
            f"'{name}' cannot name an experiment: use letters, digits, '_', '-' and '.', "
            f"starting with a letter or digit",
            field="NAME",
        )
    if destination.exists():
        raise ConfigError(
            "exists already; choose another name or remove it first", file=str(destination)
        )
    text = _NAME_LINE.sub(f"name: {name}", known[source].text, count=1)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with destination.open("x", encoding="utf-8") as handle:
        handle.write(text)
    return destination
