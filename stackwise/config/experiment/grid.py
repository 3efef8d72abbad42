"""How the axes of an experiment combine into grid points: zip groups, exclusions, counting.

A grid point maps each axis (by index) to one of its values (by index). Axes in a ``zip``
group vary together; every other axis (tuned settings and seeds included) multiplies the grid;
``exclude`` removes the points that match one of its entries.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any

import yaml

from stackwise.config.errors import ConfigError, suggest
from stackwise.config.experiment.naming import is_number, value_label
from stackwise.config.experiment.spec import Axis, Experiment
from stackwise.config.loading import read_value

# Largest grid (points before `exclude`) that is expanded without `--max-runs`: each point is
# validated and planned before anything runs, so a typo such as a 1,000-value axis in a
# product must fail at once instead of using the machine's memory.
MAX_RUNS = 10_000


def factors(experiment: Experiment, errors: list[ConfigError]) -> tuple[tuple[int, ...], ...]:
    """Groups of axes that vary together: zip groups, and every other axis on its own. A group
    takes the position of its first axis in the grid."""
    group_of: dict[int, int] = {}
    groups: list[list[int]] = []
    for number, names in enumerate(experiment.config.zip):
        members: list[int] = []
        for position, name in enumerate(names):
            where = ("zip", number, position)
            index = experiment.axis_index(name)
            if index is None:
                errors.append(experiment.error(unknown_axis(experiment, name), where))
            elif index in group_of or index in members:
                errors.append(experiment.error(f"axis '{name}' is already in a zip group", where))
            else:
                members.append(index)
        lengths = {len(experiment.axes[i].values) for i in members}
        if len(lengths) > 1:
            detail = ", ".join(
                f"{experiment.axes[i].key} has {len(experiment.axes[i].values)}" for i in members
            )
            errors.append(
                experiment.error(
                    f"zipped axes must have the same number of values ({detail})", ("zip", number)
                )
            )
        for index in members:
            group_of[index] = len(groups)
        groups.append(members)
    found: list[tuple[int, ...]] = []
    placed: set[int] = set()
    for index in range(len(experiment.axes)):
        if index in group_of:
            group = group_of[index]
            if group not in placed:
                placed.add(group)
                found.append(tuple(groups[group]))
        else:
            found.append((index,))
    return tuple(found)


def check_repeats(experiment: Experiment, errors: list[ConfigError]) -> None:
    """A value listed twice on an axis (or a repeated combination of zipped values) would give
    two runs of the same name."""
    for factor in experiment.factors:
        axes = [experiment.axes[i] for i in factor]
        if len({len(axis.values) for axis in axes}) > 1:
            continue  # reported by factors
        seen: dict[tuple[str, ...], int] = {}
        for position in range(len(axes[0].values)):
            labels = tuple(axis.labels[position] for axis in axes)
            if labels in seen:
                shown = ", ".join(labels)
                what = "value" if len(axes) == 1 else "combination of zipped values"
                errors.append(
                    experiment.error(
                        f"{what} {shown!r} is listed twice (also at position {seen[labels]})",
                        axes[0].value_path(position),
                    )
                )
            else:
                seen[labels] = position


def unknown_axis(experiment: Experiment, name: str) -> str:
    """Why `name` names no axis of the experiment, with the axes it has."""
    known = [n for axis in experiment.axes for n in axis.names()]
    close = suggest(name, known)
    hint = f"did you mean '{close}'? " if close else ""
    listing = ", ".join(known) if known else "none (this file has no grid)"
    return f"'{name}' is not a grid axis; {hint}axes: {listing}"


def not_a_value(axis: Axis, label: str) -> str:
    """Why `label` names no value of `axis`, with the values it has."""
    return f"{label!r} is not a value of axis '{axis.short_name}'; values: {', '.join(axis.labels)}"


def match_value(axis: Axis, wanted: Any) -> int | None:
    """Index of the axis value equal to `wanted` (compared by label, also as YAML text; numbers
    by value, so `3e-2` finds a value written `3.0e-2`)."""
    candidates = {value_label(wanted)}
    number = wanted
    if isinstance(wanted, str):
        with contextlib.suppress(yaml.YAMLError):
            number = read_value(wanted)
            candidates.add(value_label(number))
    for index, label in enumerate(axis.labels):
        if label in candidates:
            return index
    if is_number(number):
        for index, value in enumerate(axis.values):
            if is_number(value) and value == number:
                return index
    return None


def exclusions(experiment: Experiment, errors: list[ConfigError]) -> tuple[dict[int, int], ...]:
    """The entries of `exclude` as partial grid points (axis index -> value index)."""
    found: list[dict[int, int]] = []
    for number, entry in enumerate(experiment.config.exclude):
        point: dict[int, int] = {}
        for name, wanted in entry.items():
            where = ("exclude", number, str(name))
            index = experiment.axis_index(str(name))
            if index is None:
                errors.append(experiment.error(unknown_axis(experiment, str(name)), where))
                continue
            axis = experiment.axes[index]
            value = match_value(axis, wanted)
            if value is None:
                errors.append(experiment.error(not_a_value(axis, value_label(wanted)), where))
                continue
            point[index] = value
        found.append(point)
    return tuple(found)


def _factor_lengths(experiment: Experiment) -> list[int]:
    """How many values each group of axes that vary together has."""
    return [len(experiment.axes[factor[0]].values) for factor in experiment.factors]


def grid_points(experiment: Experiment) -> list[dict[int, int]]:
    """Every grid point (axis index -> value index) in stable order, exclusions removed."""
    points: list[dict[int, int]] = []
    for combination in itertools.product(*map(range, _factor_lengths(experiment))):
        point: dict[int, int] = {}
        for factor, value in zip(experiment.factors, combination, strict=True):
            for index in factor:
                point[index] = value
        if any(all(point[i] == v for i, v in rule.items()) for rule in experiment.exclusions):
            continue
        points.append(point)
    return points


def grid_size(experiment: Experiment) -> int:
    """Number of grid points before `exclude`, without expanding anything: the product of the
    axis lengths (a zip group counts once)."""
    return math.prod(_factor_lengths(experiment))


def check_grid_size(experiment: Experiment, max_runs: int = MAX_RUNS) -> None:
    """Raise `ConfigError` when the grid has more than `max_runs` points."""
    size = grid_size(experiment)
    if size <= max_runs:
        return
    lengths = " x ".join(map(str, _factor_lengths(experiment)))
    raise experiment.error(
        f"the grid has {size:,} points ({lengths}), more than the limit of {max_runs:,}; "
        f"make it smaller, or pass --max-runs {size} to allow it",
        ("grid",),
    )


def count_runs(experiment: Experiment) -> int:
    """Number of grid points (before `--only`, exclusions removed)."""
    return len(grid_points(experiment))
