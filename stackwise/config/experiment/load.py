"""Loading an experiment file: its schema, base settings, presets and axes, all checked.

Every setting's config path is checked against the run schema here, so that a misspelt key
is reported at the line that wrote it; whether each run's values are valid is checked when the
grid is expanded (`expand_grid`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stackwise.config.base import StackWiseConfig
from stackwise.config.errors import (
    ConfigError,
    ConfigPath,
    dotted,
    find_path_problem,
    format_validation_error,
    raise_if_any,
    suggest,
    validation_issues,
)
from stackwise.config.experiment.grid import check_repeats, exclusions, factors
from stackwise.config.experiment.naming import (
    SEED_SETTING,
    SHORT_NAME_SETTINGS,
    short_names,
    value_labels,
)
from stackwise.config.experiment.schema import BUILTIN_PRESETS, SECTIONS, ExperimentConfig
from stackwise.config.experiment.settings import Assignment, flatten, resolve, settings_at
from stackwise.config.experiment.spec import Axis, Experiment, Role
from stackwise.config.loading import load_mapping

_AXIS_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def load_experiment(path: str | Path) -> Experiment:
    """Load an experiment file and check its structure, presets, axes, zip and exclude.

    Raises `ConfigError` (all problems found together). Resolving and validating every run's
    config is done by `expand_grid`, which `stackwise validate` always calls as well.
    """
    document = load_mapping(path)
    file = str(path)
    try:
        config = ExperimentConfig.model_validate(document.data)
    except ValidationError as error:
        raise format_validation_error(
            error, ExperimentConfig, file=file, lines=document.lines
        ) from None

    experiment = Experiment(
        path=Path(file), config=config, lines=document.lines, number_texts=document.number_texts
    )
    errors: list[ConfigError] = []

    # Base settings: the sections at the top of the file.
    base: list[Assignment] = []
    for section, tree in config.base.items():
        base.extend(flatten(tree, (section,), (section,)))
    valid = _check_assignments(experiment, base, errors)
    experiment.base = tuple(base)

    experiment.presets = _presets(experiment, errors)
    experiment.axes = _axes(experiment, errors)
    if errors:
        # Found together with the misspelt keys: the values of the base settings written right.
        errors.extend(_base_value_errors(experiment, valid))
    raise_if_any(errors)

    experiment.factors = factors(experiment, errors)
    check_repeats(experiment, errors)
    experiment.exclusions = exclusions(experiment, errors)
    raise_if_any(errors)
    return experiment


def _check_assignments(
    experiment: Experiment, assignments: Sequence[Assignment], errors: list[ConfigError]
) -> list[Assignment]:
    """Report each setting whose config path the run schema does not have; the others."""
    valid: list[Assignment] = []
    for assignment in assignments:
        problem = find_path_problem(StackWiseConfig, assignment.path)
        if problem is None:
            valid.append(assignment)
            continue
        where = assignment.file_path
        if where is None:
            errors.append(
                ConfigError(
                    f"{problem.message()} (in {assignment.source})",
                    file=experiment.file,
                    field=dotted(assignment.path),
                )
            )
            continue
        # Cut the file path after the key that holds the bad segment, so the error names the
        # key as written (`training.optimzer`, not `training.optimzer.lr`).
        keys_before = len(where) - len(assignment.spans)
        offset = len(assignment.path) - sum(assignment.spans)
        cut, last_segment = len(where), True
        for number, span in enumerate(assignment.spans):
            if problem.index < offset + span:
                cut = keys_before + number + 1
                last_segment = problem.index == offset + span - 1
                break
            offset += span
        errors.append(
            experiment.error(problem.message(name_in_message=not last_segment), where[:cut])
        )
    return valid


def _base_value_errors(experiment: Experiment, base: Sequence[Assignment]) -> list[ConfigError]:
    """The errors of values that base settings give their own field (a value not allowed, a
    number out of range), checked on the base settings alone; problems between settings, which
    the grid may resolve, are left to `expand_grid`."""
    tree, _ = resolve(base)
    try:
        StackWiseConfig.model_validate(tree)
    except ValidationError as error:
        written = {assignment.path: assignment for assignment in base}
        found = []
        for issue in validation_issues(error, StackWiseConfig):
            assignment = written.get(tuple(str(part) for part in issue.path))
            if assignment is None or assignment.file_path is None:
                continue
            found.append(experiment.error(issue.message, assignment.file_path))
        return found
    return []


def _presets(
    experiment: Experiment, errors: list[ConfigError]
) -> dict[str, dict[str, tuple[Assignment, ...]]]:
    """The presets of every preset axis: built-in ones, then the file's (same name replaces the
    built-in preset)."""
    presets: dict[str, dict[str, tuple[Assignment, ...]]] = {}
    for axis_name, named in BUILTIN_PRESETS.items():
        presets[axis_name] = {
            preset: tuple(flatten(tree, (), f"built-in preset {axis_name}={preset}"))
            for preset, tree in named.items()
        }
    for axis_name, named in experiment.config.presets.items():
        if not _AXIS_NAME_PATTERN.match(axis_name) or axis_name in SECTIONS:
            errors.append(
                experiment.error(
                    "a preset axis name must be a plain name (letters, digits, '_', '-'; no "
                    f"dots) other than {', '.join(SECTIONS)}",
                    ("presets", axis_name),
                )
            )
            continue
        resolved = dict(presets.get(axis_name, {}))
        for preset, tree in named.items():
            settings = flatten(tree, (), ("presets", axis_name, preset))
            _check_assignments(experiment, settings, errors)
            resolved[preset] = tuple(settings)
        presets[axis_name] = resolved
    return presets


def _axes(experiment: Experiment, errors: list[ConfigError]) -> tuple[Axis, ...]:
    """The axes, in file order: the grid's, then the tuned settings, then the seeds; a short
    name (`mode`) stands for its setting."""
    config, presets = experiment.config, experiment.presets
    entries: list[tuple[str, list[Any], ConfigPath, Role]] = [
        (key, values, ("grid", key), "grid") for key, values in (config.grid or {}).items()
    ]
    entries += [(key, values, ("tune", key), "tune") for key, values in (config.tune or {}).items()]
    if config.seeds is not None:
        entries.append((SEED_SETTING, list(config.seeds), ("seeds",), "seed"))
    keys = [entry[0] for entry in entries]
    grid_presets = {k for k, *_, role in entries if role == "grid" and k in presets}
    setting_keys = [k if k in grid_presets else SHORT_NAME_SETTINGS.get(k, k) for k in keys]
    short = short_names(setting_keys, grid_presets)
    axes: list[Axis] = []
    first_key: dict[str, str] = {}
    for (key, values, where, role), setting_key, short_name in zip(
        entries, setting_keys, short, strict=True
    ):
        if setting_key in first_key:
            if role == "seed":
                message = (
                    f"'{first_key[setting_key]}' and `seeds` both vary {SEED_SETTING}; list the "
                    f"seeds once, under `seeds`"
                )
            else:
                message = (
                    f"'{first_key[setting_key]}' and '{key}' are the same axis "
                    f"({setting_key}); list its values once"
                )
            errors.append(experiment.error(message, where))
            continue
        first_key[setting_key] = key
        if role == "tune" and key in presets:
            errors.append(
                experiment.error(
                    f"'{key}' is a preset axis; `tune` takes settings such as "
                    f"training.optimizer.lr (put preset axes under `grid`)",
                    where,
                )
            )
            continue
        per_value = (
            _preset_values(experiment, key, values, where, errors)
            if key in grid_presets
            else _setting_values(experiment, setting_key, values, where, errors)
        )
        if per_value is None:
            continue
        axes.append(
            Axis(
                key=key if role != "seed" else "seed",
                short_name=short_name,
                is_preset=key in grid_presets,
                values=tuple(values),
                labels=value_labels(values, where, experiment.number_texts),
                assignments=per_value,
                setting=setting_key,
                role=role,
            )
        )
    return tuple(axes)


def _preset_values(
    experiment: Experiment,
    key: str,
    values: list[Any],
    where: ConfigPath,
    errors: list[ConfigError],
) -> tuple[tuple[Assignment, ...], ...]:
    """The settings of each value of preset axis `key` (none for an unknown preset)."""
    known = experiment.presets[key]
    per_value: list[tuple[Assignment, ...]] = []
    for position, value in enumerate(values):
        if not isinstance(value, str) or value not in known:
            close = suggest(str(value), list(known))
            hint = f"did you mean '{close}'? " if close else ""
            errors.append(
                experiment.error(
                    f"unknown preset {value!r} for '{key}'; {hint}"
                    f"known presets: {', '.join(known)}",
                    (*where, position),
                )
            )
            per_value.append(())
        else:
            per_value.append(known[value])
    return tuple(per_value)


def _setting_values(
    experiment: Experiment,
    setting_key: str,
    values: list[Any],
    where: ConfigPath,
    errors: list[ConfigError],
) -> tuple[tuple[Assignment, ...], ...] | None:
    """The settings of each value of the axis varying `setting_key`; None (and an error) when
    the run schema has no such setting."""
    setting = tuple(setting_key.split("."))
    problem = find_path_problem(StackWiseConfig, setting)
    if problem is not None:
        preset_axes = ", ".join(sorted(experiment.presets))
        is_last = problem.index == len(setting) - 1
        errors.append(
            experiment.error(
                f"{problem.message(name_in_message=not is_last)} (an axis is a dotted "
                f"setting such as training.objective, one of the short names "
                f"{', '.join(SHORT_NAME_SETTINGS)}, or a preset axis: {preset_axes})",
                where,
            )
        )
        return None
    per_value: list[tuple[Assignment, ...]] = []
    for position, value in enumerate(values):
        settings = settings_at(setting, value, (*where, position))
        _check_assignments(experiment, settings, errors)
        per_value.append(tuple(settings))
    return tuple(per_value)
