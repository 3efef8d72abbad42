"""Expanding an experiment's grid into runs: every point's settings resolved into a config,
validated as a `StackWiseConfig` and named; runs identical to an earlier one (the same
`StackWiseConfig.config_hash()`) dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from stackwise.config.base import StackWiseConfig
from stackwise.config.errors import (
    ConfigError,
    ConfigPath,
    dotted,
    raise_if_any,
    validation_issues,
)
from stackwise.config.experiment.filters import Filter, keep, parse_only
from stackwise.config.experiment.grid import MAX_RUNS, check_grid_size, grid_points
from stackwise.config.experiment.naming import PointNames, point_names
from stackwise.config.experiment.overrides import parse_overrides
from stackwise.config.experiment.settings import Assignment, Source, resolve
from stackwise.config.experiment.spec import Experiment, RunSpec


def expand_grid(
    experiment: Experiment,
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
    notes: list[str] | None = None,
    strict_only: bool = True,
    max_runs: int = MAX_RUNS,
) -> list[RunSpec]:
    """All runs of an experiment, fully resolved and validated, in stable grid order.

    `overrides` (``key=value``, value read as YAML) apply to every run; `only` keeps the runs
    whose coordinate (short or dotted axis name) or resolved setting has the given value. A
    filter naming an axis, value or setting this file does not have is an error, unless
    `strict_only` is False (several files: see `only_problems`), where it matches no run.
    Every run of the grid is validated, also those `only` leaves out, and all problems are
    raised together as one `ConfigError`. Runs identical to an earlier one (same config hash)
    are dropped; a line saying so is appended to `notes` when given. A grid of more than
    `max_runs` points is an error, found before anything is expanded.
    """
    check_grid_size(experiment, max_runs)
    problems: list[ConfigError] = []
    extra: list[Assignment] = []
    filters: list[Filter] = []
    try:
        extra = parse_overrides(overrides)
    except ConfigError as error:
        problems.append(error)
    try:
        filters = parse_only(experiment, only, strict=strict_only)
    except ConfigError as error:
        problems.append(error)
    raise_if_any(problems)
    points = grid_points(experiment)
    if not points:
        raise experiment.error("`exclude` leaves no run of the grid", ("exclude",))

    failures: dict[str, tuple[ConfigError, list[str]]] = {}
    resolved: list[tuple[PointNames, dict[int, int], StackWiseConfig]] = []
    for point in points:
        names = point_names(experiment, point)
        assignments: list[Assignment] = list(experiment.base)
        for index in range(len(experiment.axes)):
            if index in point:
                assignments.extend(experiment.axes[index].assignments[point[index]])
        assignments.extend(extra)
        tree, provenance = resolve(assignments)
        try:
            config = StackWiseConfig.model_validate(tree)
        except ValidationError as error:
            for issue in validation_issues(error, StackWiseConfig):
                line, note = _locate(experiment, provenance, issue.path)
                problem = ConfigError(
                    issue.message + note, file=experiment.file, field=dotted(issue.path), line=line
                )
                key = problem.format()
                failures.setdefault(key, (problem, []))[1].append(names.name)
            continue
        resolved.append((names, point, config))

    if failures:
        raise ConfigError.combine(
            [_naming_runs(problem, failed, len(points)) for problem, failed in failures.values()]
        )

    runs: list[RunSpec] = []
    first_of: dict[str, str] = {}
    for names, point, config in resolved:
        if filters and not keep(filters, point, config):
            continue
        digest = config.config_hash()
        if digest in first_of:
            if notes is not None:
                notes.append(
                    f"{experiment.file}: run {names.name} is identical to run "
                    f"{first_of[digest]} (config hash {digest}); it runs once"
                )
            continue
        first_of[digest] = names.name
        runs.append(
            RunSpec(
                experiment_name=experiment.name,
                file=experiment.path,
                name=names.name,
                coordinates=names.coordinates,
                config=config,
                config_hash=digest,
                tuned=names.tuned,
                seed=names.seed,
                point=names.point,
            )
        )
    return runs


def _naming_runs(problem: ConfigError, failed: list[str], points: int) -> ConfigError:
    """`problem`, naming the runs it fails (the first three) when some runs of a grid of
    `points` runs pass."""
    if points <= 1 or len(failed) >= points:
        return problem
    shown = "; ".join(failed[:3]) + (f"; and {len(failed) - 3} more" if len(failed) > 3 else "")
    label = "run" if len(failed) == 1 else "runs"
    return ConfigError(
        f"{problem.message} ({label} {shown})",
        file=problem.file,
        field=problem.field,
        line=problem.line,
    )


def _locate(
    experiment: Experiment, provenance: dict[tuple[str, ...], Source], path: ConfigPath
) -> tuple[int | None, str]:
    """Line (in the experiment file) that set the value at `path`, and a note when it was set
    outside the file."""
    for cut in range(len(path), 0, -1):
        prefix = tuple(str(p) for p in path[:cut])
        if prefix in provenance:
            source = provenance[prefix]
            if isinstance(source, str):
                return None, f" (from {source})"
            return experiment.line_of(source + tuple(path[cut:])), ""
    # Not set as a whole (a default, or a section set key by key): the base sections sit at the
    # top of the file under their config paths, so point at the nearest one written there.
    return experiment.line_of(path), ""


def setting_line(experiment: Experiment, spec: RunSpec, path: Sequence[str | int]) -> int | None:
    """Line of the experiment file that gave run `spec` its value at `path`: the last base
    setting or grid value that set it (for a built-in preset: the line of the preset's name in
    the grid). None when only a default or `--set` gave it."""
    found: int | None = None
    wanted = tuple(str(p) for p in path)
    candidates: list[tuple[Sequence[Assignment], ConfigPath | None]] = [(experiment.base, None)]
    labels = spec.labels
    for axis in experiment.axes:
        label = labels.get(axis.short_name)
        if label in axis.labels:
            position = axis.labels.index(label)
            candidates.append((axis.assignments[position], axis.value_path(position)))
    for assignments, value_path in candidates:
        for assignment in assignments:
            if wanted[: len(assignment.path)] != assignment.path:
                continue
            source = assignment.file_path
            if source is not None:
                found = experiment.line_of(source + tuple(path[len(assignment.path) :]))
            elif value_path is not None:
                found = experiment.line_of(value_path)
    return found
