"""Settings of an experiment: one value at one config path, and where it was written.

The base sections, every preset, every axis value and every ``--set`` option become a list of
`Assignment`; a run's config tree is its settings applied in order (`resolve`), with a record
of which one set each path, so that a validation error can point at the line that set it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from stackwise.config.errors import ConfigPath

# Where a setting came from: a path inside the experiment file, or a description of something
# outside it (a built-in preset, a --set option).
Source: TypeAlias = ConfigPath | str


@dataclass(frozen=True)
class Assignment:
    """One setting: config path, value, and where it was written."""

    path: tuple[str, ...]
    value: Any
    source: Source
    # How many config path segments each of the trailing keys of `source` spans (a dotted key
    # such as `model.d_model` spans two); lets an error point at the key the user wrote.
    spans: tuple[int, ...] = ()

    @property
    def file_path(self) -> ConfigPath | None:
        """Where in the experiment file it was written; None when it came from outside it."""
        return self.source if isinstance(self.source, tuple) else None


def flatten(
    tree: dict[Any, Any],
    config_path: tuple[str, ...],
    source: Source,
    spans: tuple[int, ...] = (),
) -> list[Assignment]:
    """Settings from a nested/dotted mapping: one `Assignment` per leaf, in file order."""
    found: list[Assignment] = []
    for key, value in tree.items():
        key_text = str(key)
        segments = tuple(key_text.split("."))
        path = config_path + segments
        where: Source = (*source, key_text) if isinstance(source, tuple) else source
        covered = (*spans, len(segments))
        if isinstance(value, dict) and value:
            found.extend(flatten(value, path, where, covered))
        else:
            found.append(Assignment(path, value, where, covered))
    return found


def settings_at(path: tuple[str, ...], value: Any, source: Source) -> list[Assignment]:
    """The settings that giving `path` the value `value` makes: one per leaf of a non-empty
    mapping (a partial section merges into what is there), else the one setting."""
    if isinstance(value, dict) and value:
        return flatten(value, path, source)
    return [Assignment(path, value, source)]


def resolve(
    assignments: Sequence[Assignment],
) -> tuple[dict[str, Any], dict[tuple[str, ...], Source]]:
    """Apply settings in order to an empty tree; mappings merge, anything else replaces."""
    tree: dict[str, Any] = {}
    provenance: dict[tuple[str, ...], Source] = {}
    for assignment in assignments:
        node = tree
        for part in assignment.path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        leaf = assignment.path[-1]
        value = assignment.value
        _clear_other_budgets(assignment, node, provenance)
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = _copy(value)
        # A later setting of a whole subtree replaces what was recorded below it.
        for recorded in [p for p in provenance if p[: len(assignment.path)] == assignment.path]:
            del provenance[recorded]
        provenance[assignment.path] = assignment.source
    return tree, provenance


_BUDGET_KINDS = ("steps", "tokens", "flops")


def _clear_other_budgets(
    assignment: Assignment,
    node: dict[str, Any],
    provenance: dict[tuple[str, ...], Source],
) -> None:
    """A budget is one of steps, tokens or flops: a later layer that sets one (`--set
    training.budget.flops=2e12`, a preset, a grid axis) replaces the kinds an earlier layer set
    (the file's `steps`). Within one layer two kinds stay an error."""
    keys = tuple(str(p) for p in assignment.path)
    if keys[:-1] != ("training", "budget") or keys[-1] not in _BUDGET_KINDS:
        return
    if assignment.value is None:
        return
    for kind in _BUDGET_KINDS:
        if kind == keys[-1] or kind not in node:
            continue
        earlier = provenance.get(("training", "budget", kind))
        if earlier is None or _layer(earlier) != _layer(assignment.source):
            node.pop(kind, None)


def _layer(source: Source) -> object:
    """Which layer of an experiment a setting comes from: the base sections, one preset entry
    or grid value, or the command line."""
    if isinstance(source, str):
        return "command line"
    if source and source[0] in ("presets", "grid"):
        return tuple(source[:3])
    return "base"


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
