"""User-facing configuration errors.

Every mistake in an experiment file (or a `--set`/`--only` option) becomes a `ConfigError`
with the file, the dotted field and, where the YAML parser knows it, the line::

    experiments/foo.yaml:12: model.n_heads: d_model (100) must be divisible by n_heads (8)
    experiments/foo.yaml:7: training.optimzer: unknown field; did you mean 'optimizer'?

Several errors found together travel as one `ConfigError` (see `ConfigError.combine`) whose
`errors` lists them, so a user fixes a file in one pass instead of one error per attempt.

This module also turns pydantic `ValidationError`s into such messages. Cross-field validators in
`stackwise.config.base` follow one convention: they raise ``ValueError("field.path: message")``
where the path is relative to the model being validated; `validation_issues` joins that prefix
with pydantic's location so the user sees the full dotted field.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ValidationError

ConfigPath = tuple[str | int, ...]

# "model.n_heads: message" -> ("model.n_heads", "message"); the prefix must look like a field path
# so that a message which merely contains ": " is not split.
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*): (.+)$", re.DOTALL)


class ConfigError(Exception):
    """An error in user input: which file, which dotted field, which line, and what is wrong.

    `str(error)` is the message shown to the user (one line per error). A combined error
    (`ConfigError.combine`) carries the first error's attributes and lists all in `errors`.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        field: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.field = field or None
        self.line = line
        self.column = column
        self._errors: list[ConfigError] = [self]
        super().__init__(self.format())

    @property
    def errors(self) -> list[ConfigError]:
        """The individual errors (just this one unless it was built by `combine`)."""
        return list(self._errors)

    def format(self) -> str:
        """`file:line[:column]: field: message`, leaving out the parts that are unknown."""
        parts: list[str] = []
        if self.file is not None:
            location = self.file
            if self.line is not None:
                location += f":{self.line}"
                if self.column is not None:
                    location += f":{self.column}"
            parts.append(location)
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)

    def __str__(self) -> str:
        return "\n".join(error.format() for error in self._errors)

    @classmethod
    def combine(cls, errors: Sequence[ConfigError]) -> ConfigError:
        """One exception carrying several errors (duplicates dropped, order kept)."""
        flat: list[ConfigError] = []
        seen: set[str] = set()
        for error in errors:
            for single in error.errors:
                text = single.format()
                if text not in seen:
                    seen.add(text)
                    flat.append(single)
        if not flat:
            raise ValueError("ConfigError.combine needs at least one error")
        if len(flat) == 1:
            return flat[0]
        first = flat[0]
        combined = cls(
            first.message, file=first.file, field=first.field, line=first.line, column=first.column
        )
        combined._errors = flat
        combined.args = (str(combined),)
        return combined


def raise_if_any(errors: Sequence[ConfigError]) -> None:
    """Raise all collected errors together, if there are any."""
    if errors:
        raise ConfigError.combine(errors)


def dotted(path: Sequence[str | int]) -> str:
    """("model", "stacks", 0, "n_heads") -> "model.stacks.0.n_heads"."""
    return ".".join(str(part) for part in path)


# --------------------------------------------------------------------------------------------
# walking the schema: which fields exist where (for did-you-mean and axis checks)
# --------------------------------------------------------------------------------------------


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `ModelConfig` or `MLAConfig | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for argument in typing.get_args(annotation):
            found = _model_class(argument)
            if found is not None:
                return found
    return None


def _list_item(annotation: Any) -> Any | None:
    """The item annotation of `list[X]` (or `list[X] | None`), else None."""
    origin = typing.get_origin(annotation)
    if origin is list:
        args = typing.get_args(annotation)
        return args[0] if args else None
    if origin in (Union, types.UnionType):
        for argument in typing.get_args(annotation):
            item = _list_item(argument)
            if item is not None:
                return item
    return None


def model_at(root: type[BaseModel], path: Sequence[str | int]) -> type[BaseModel] | None:
    """The model class found at `path` below `root` (list indices step into list items)."""
    annotation: Any = root
    for part in path:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            annotation = _list_item(annotation)
            if annotation is None:
                return None
            continue
        model = _model_class(annotation)
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
    return _model_class(annotation)


def suggest(name: str, candidates: Sequence[str]) -> str | None:
    """The closest candidate to a misspelled name, if one is close enough."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_field_message(name: str, known: Sequence[str], *, name_in_message: bool) -> str:
    """'unknown field; did you mean 'x'?' (or the list of known fields when none is close)."""
    head = f"unknown field '{name}'" if name_in_message else "unknown field"
    close = suggest(name, known)
    if close is not None:
        return f"{head}; did you mean '{close}'?"
    return f"{head}; known fields: {', '.join(sorted(known))}"


def field_paths(root: type[BaseModel]) -> list[tuple[str, ...]]:
    """Every field path below `root` (sections and settings; list items not entered)."""
    found: list[tuple[str, ...]] = []
    for name, field in root.model_fields.items():
        found.append((name,))
        inner = _model_class(field.annotation)
        if inner is not None:
            found.extend((name, *rest) for rest in field_paths(inner))
    return found


def full_paths_of(root: type[BaseModel], partial: Sequence[str]) -> list[str]:
    """The field paths below `root` that end with `partial` (``budget.steps`` ->
    ``training.budget.steps``), shortest first."""
    tail = tuple(partial)
    matches = [path for path in field_paths(root) if path[-len(tail) :] == tail]
    return [dotted(path) for path in sorted(matches, key=len)]


@dataclass(frozen=True)
class PathProblem:
    """Why a dotted key names no setting: segment `index` (`name`) is not a field of `parent`."""

    index: int
    name: str
    parent: str
    known: tuple[str, ...]  # fields of `parent`; empty when `parent` is a single setting
    elsewhere: tuple[str, ...] = ()  # full paths of the same key written from a wrong place

    def message(self, *, name_in_message: bool = True) -> str:
        if not self.known:
            return (
                f"'{self.parent}' is a single setting, not a section; it has no field '{self.name}'"
            )
        if self.elsewhere:
            head = f"unknown field '{self.name}'" if name_in_message else "unknown field"
            quoted = [f"'{path}'" for path in self.elsewhere]
            return f"{head}; did you mean {' or '.join(quoted)}?"
        return unknown_field_message(self.name, self.known, name_in_message=name_in_message)


def find_path_problem(root: type[BaseModel], path: Sequence[str]) -> PathProblem | None:
    """The first segment of `path` that is not a field below `root` (None when all are).

    Used for grid axes, presets and `--set`: each dotted key must reach an existing field. A key
    whose rest exists deeper down (``budget.steps``, ``training.lr``) names the full path.
    """
    model: type[BaseModel] | None = root
    for index, part in enumerate(path):
        if model is None:
            return PathProblem(index, part, dotted(path[:index]), ())
        if part not in model.model_fields:
            prefix = dotted(path[:index])
            elsewhere = tuple(
                f"{prefix}.{below}" if prefix else below
                for below in full_paths_of(model, path[index:])
            )
            return PathProblem(
                index, part, dotted(path[:index]), tuple(model.model_fields), elsewhere
            )
        model = _model_class(model.model_fields[part].annotation)
    return None


def check_setting_path(root: type[BaseModel], path: Sequence[str]) -> str | None:
    """Why `path` names no setting of `root`, as a message naming the bad segment (or None)."""
    problem = find_path_problem(root, path)
    return problem.message() if problem is not None else None


# --------------------------------------------------------------------------------------------
# pydantic ValidationError -> (dotted field, message) pairs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issue:
    """One validation problem: where (a path in the validated data) and what."""

    path: ConfigPath
    message: str


_QUOTED = re.compile(r"'([^']*)'")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def validation_issues(error: ValidationError, root: type[BaseModel]) -> list[Issue]:
    """Turn pydantic's errors into one clear `Issue` each (full dotted path + message)."""
    issues: list[Issue] = []
    for item in error.errors(include_url=False):
        path: ConfigPath = tuple(item.get("loc", ()))
        kind = item.get("type", "")
        context = item.get("ctx") or {}
        value = item.get("input")
        if kind == "extra_forbidden":
            name = str(path[-1]) if path else ""
            parent = model_at(root, path[:-1])
            known = list(parent.model_fields) if parent is not None else []
            message = (
                unknown_field_message(name, known, name_in_message=False)
                if known
                else "unknown field"
            )
        elif kind == "missing":
            message = "required field is missing"
        elif kind == "too_short":
            message = (
                f"needs at least {context.get('min_length', 1)} item(s), "
                f"got {context.get('actual_length', 0)}"
            )
        elif kind == "literal_error":
            expected = str(context.get("expected", "?"))
            message = f"got {_show(value)}; allowed values: {expected}"
            close = suggest(str(value), _QUOTED.findall(expected)) if _is_scalar(value) else None
            if close is not None:
                message = f"got {_show(value)}; did you mean '{close}'? (allowed: {expected})"
        elif kind in ("value_error", "assertion_error"):
            raw = context.get("error")
            text = str(raw) if raw is not None else str(item.get("msg", ""))
            match = _FIELD_PREFIX.match(text)
            if match:
                extra = tuple(
                    int(part) if part.isdigit() else part for part in match.group(1).split(".")
                )
                path = path + extra
                text = match.group(2)
            message = text
        else:
            message = str(item.get("msg", "invalid value"))
            if _is_scalar(value):
                message += f" (got {_show(value)})"
        issues.append(Issue(path=path, message=message))
    return issues


def format_validation_error(
    error: ValidationError,
    root: type[BaseModel],
    *,
    file: str | Path | None = None,
    lines: dict[ConfigPath, int] | None = None,
    prefix: ConfigPath = (),
) -> ConfigError:
    """A `ConfigError` (all issues combined) for a model validated straight from one YAML file.

    `lines` maps paths in the file to line numbers (see `stackwise.config.loading`); `prefix` is
    where the validated data sits in that file.
    """
    found: list[ConfigError] = []
    for issue in validation_issues(error, root):
        full = prefix + issue.path
        line = line_of(lines, full) if lines is not None else None
        found.append(ConfigError(issue.message, file=file, field=dotted(full), line=line))
    return ConfigError.combine(found)


def line_of(lines: dict[ConfigPath, int], path: Sequence[str | int]) -> int | None:
    """Line of `path`, or of its nearest ancestor the YAML index knows."""
    key: ConfigPath = tuple(path)
    while key:
        if key in lines:
            return lines[key]
        key = key[:-1]
    return None
