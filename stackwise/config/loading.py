"""Strict, safe YAML loading for configuration files.

`load_yaml(path)` parses with `yaml.safe_load` semantics (plain data only, nothing is ever
instantiated from tags) through `StrictLoader`, which adds two things plain PyYAML lacks:

* duplicate keys in one mapping are an error (PyYAML would silently keep the last one), and
* the line of every key and list item is recorded, so a validation error found later can point
  at the line of the offending field, and
* numbers are read as YAML 1.2 reads them: `1e-3` and `1e6` are floats (YAML 1.1, which
  PyYAML follows, reads an exponent without a dot as a string), so a quoted `'1e-3'` is the only
  string that looks like a number — and the schema refuses strings where it wants numbers, and
* input is bounded: a file over `MAX_YAML_BYTES`, or one whose aliases expand to more than
  `MAX_YAML_NODES` keys and values (an "alias bomb": nine levels of nine aliases are 9^9 values
  written in a few lines), is an error found before anything is built from it.

Malformed YAML becomes a `ConfigError` with the file and the parser's line and column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from stackwise.config.errors import (
    ConfigError,
    ConfigPath,
    dotted,
    format_validation_error,
    line_of,
)

_MERGE_TAG = "tag:yaml.org,2002:merge"
# Bounds on configuration input: far above any real experiment file (the shipped ones have a
# few hundred values), far below what would stall validation.
MAX_YAML_BYTES = 4 * 2**20
MAX_YAML_NODES = 200_000

Schema = TypeVar("Schema", bound=BaseModel)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping repeats a key; `path` is the dotted location of the repeated key."""

    def __init__(self, path: ConfigPath, first_line: int, node: Node) -> None:
        super().__init__(
            problem=f"duplicate key (first defined on line {first_line})",
            problem_mark=node.start_mark,
        )
        self.path = path
        self.first_line = first_line


class ExpansionError(yaml.constructor.ConstructorError):
    """The document expands (through aliases) to more than `MAX_YAML_NODES` values."""

    def __init__(self, node: Node) -> None:
        super().__init__(
            problem=f"the document expands to more than {MAX_YAML_NODES:,} keys and values "
            "through YAML aliases (&anchor / *alias); write the values out or use fewer aliases",
            problem_mark=node.start_mark,
        )


# A YAML 1.2 float: digits with an optional fraction and an optional exponent (`1e-3`, `2.5`,
# `.5`, `6E+2`); what YAML 1.1 already reads as int or float keeps its own resolver.
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class NumberLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that reads YAML 1.2 exponent floats (`1e-3`) as numbers."""


NumberLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def read_value(text: str) -> Any:
    """A scalar or flow value as YAML (with `NumberLoader`): `--set` and `--only` values."""
    return yaml.load(text, Loader=NumberLoader)


class StrictLoader(NumberLoader):
    """`NumberLoader` (a `yaml.SafeLoader`) that rejects duplicate keys and records key line numbers.

    After `get_single_data()`, `key_lines` maps each path (mapping keys as strings, list
    positions as ints) to its 1-based line.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.key_lines: dict[ConfigPath, int] = {}
        # The text of every number as written (`1.0e11`, `3e-2`): run names show what the file
        # says, not a re-printed float.
        self.number_texts: dict[ConfigPath, str] = {}
        self.expanded = 0  # nodes visited with aliases expanded (bounded by MAX_YAML_NODES)

    def construct_document(self, node: Node) -> Any:
        # Index the whole node tree before building Python objects: the paths of keys are only
        # known while walking from the root, and duplicates must be caught before the
        # constructor lets the last one win.
        self._index(node, (), set())
        return super().construct_document(node)

    def _index(self, node: Node, path: ConfigPath, active: set[int]) -> None:
        if id(node) in active:  # a recursive alias; its content is indexed where it is defined
            return
        self.expanded += 1
        if self.expanded > MAX_YAML_NODES:
            raise ExpansionError(node)
        active.add(id(node))
        if isinstance(node, ScalarNode) and node.tag.endswith((":int", ":float")):
            self.number_texts.setdefault(path, node.value)
        if isinstance(node, MappingNode):
            first_seen: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = (
                    key_node.value
                    if isinstance(key_node, ScalarNode)
                    else str(self.construct_object(key_node, deep=True))
                )
                line = key_node.start_mark.line + 1
                child = (*path, key)
                identity = (key_node.tag, key)
                if identity in first_seen:
                    raise DuplicateKeyError(child, first_seen[identity], key_node)
                first_seen[identity] = line
                self.key_lines.setdefault(child, line)
                self._index(value_node, child, active)
        elif isinstance(node, SequenceNode):
            for position, item in enumerate(node.value):
                child = (*path, position)
                self.key_lines.setdefault(child, item.start_mark.line + 1)
                self._index(item, child, active)
        active.discard(id(node))


@dataclass
class YamlDocument:
    """Parsed YAML data together with where each key was written."""

    path: Path
    data: Any
    lines: dict[ConfigPath, int] = field(default_factory=dict)
    number_texts: dict[ConfigPath, str] = field(default_factory=dict)  # numbers as written

    def line_of(self, path: ConfigPath) -> int | None:
        """Line of `path` (or of its nearest recorded ancestor)."""
        return line_of(self.lines, path)


def read_text(path: str | Path) -> str:
    """The file's text, or a `ConfigError` saying why it cannot be read."""
    file = Path(path)
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=path) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a YAML file", file=path) from None
    except PermissionError:
        raise ConfigError("permission denied", file=path) from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"not UTF-8 text (byte {error.start})", file=path) from None
    except OSError as error:
        raise ConfigError(f"cannot read file: {error.strerror or error}", file=path) from None


def parse_yaml(text: str, *, file: str | Path) -> YamlDocument:
    """Parse YAML text strictly; errors name `file` and the parser's line and column."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(
            f"the file has {len(text):,} characters, more than the limit of "
            f"{MAX_YAML_BYTES:,} for a configuration file",
            file=file,
        )
    loader = StrictLoader(text)
    try:
        data = loader.get_single_data()
    except DuplicateKeyError as error:
        mark = error.problem_mark
        raise ConfigError(
            f"duplicate key (first defined on line {error.first_line})",
            file=file,
            field=dotted(error.path),
            line=mark.line + 1 if mark is not None else None,
        ) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = error.problem or error.context or "invalid YAML"
        if error.context and error.problem:
            context = error.context
            start = error.context_mark
            if start is not None and mark is not None and start.line != mark.line:
                context += f" that starts at line {start.line + 1}, column {start.column + 1}"
            problem = f"{problem} ({context})"
        raise ConfigError(
            f"invalid YAML: {problem}",
            file=file,
            line=mark.line + 1 if mark is not None else None,
            column=mark.column + 1 if mark is not None else None,
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML: {error}", file=file) from None
    finally:
        loader.dispose()
    return YamlDocument(
        path=Path(file),
        data=data,
        lines=dict(loader.key_lines),
        number_texts=dict(loader.number_texts),
    )


def load_yaml(path: str | Path) -> YamlDocument:
    """Read and strictly parse one YAML file (see `StrictLoader`)."""
    return parse_yaml(read_text(path), file=path)


def load_mapping(path: str | Path) -> YamlDocument:
    """Like `load_yaml`, but the top level must be a mapping (an empty file gives `{}`)."""
    document = load_yaml(path)
    if document.data is None:
        document.data = {}
    if not isinstance(document.data, dict):
        raise ConfigError(
            f"the top level must be a mapping of keys to values, got {type(document.data).__name__}",
            file=path,
            line=1,
        )
    return document


def load_validated(path: str | Path, schema: type[Schema]) -> Schema:
    """Load a YAML mapping and validate it as `schema` (a pydantic model, e.g.
    `StackWiseConfig`), with file/line-aware errors."""
    document = load_mapping(path)
    try:
        return schema.model_validate(document.data)
    except ValidationError as error:
        raise format_validation_error(error, schema, file=path, lines=document.lines) from None
