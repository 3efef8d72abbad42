"""Experiment files: a base run config, named presets and a grid of runs.

An experiment file (``experiments/*.yaml``) looks like this::

    name: size_vs_mode                 # safe identifier; also the MLflow experiment name
    description: Depth-wise vs end-to-end training at three sizes.
    schema_version: 1
    model: {attention_type: mha}       # the base run config: the sections of StackWiseConfig
    training: {budget: {steps: 200}}
    presets:                           # optional: named bundles of settings, per preset axis
      size:
        tiny: {model.d_model: 32, model: {architecture: {n_stacks: 1}}}
    grid:                              # each point of the product is one run
      size: [tiny, small]              # a preset axis (built-in size presets: small/medium/large)
      training.training_architecture: [layerwise, stackwise, rackwise]   # a setting axis
    zip: []                            # optional: groups of axes that vary together
    exclude:                           # optional: grid points to skip
      - {size: tiny, mode: rackwise}
    tune:                              # optional: every grid point runs for every value
      training.optimizer.lr: [1.0e-3, 3.0e-3]
    seeds: [0, 1, 2]                   # optional: replicates of every run

Seeds and tuned settings multiply the runs without being grid coordinates: ``seeds`` runs every
grid point once per seed (``training.seed``: initialisation and data order; the data split
does not depend on it, see ``data.split_seed``), ``tune`` once per value of each tuned setting.
A run's name lists its grid coordinates, then its tuned values, then ``seed=N``
(``mode=rackwise,lr=0.003,seed=1``); `RunSpec.coordinates` holds the grid coordinates only, and
`stackwise compare` averages over seeds and picks each grid point's best tuned value on
validation loss.

Each run's config is built in a fixed order — the base sections, then each axis in the order the
grid lists them (a preset's settings or the axis value), then ``--set`` overrides — and then
validated as a `StackWiseConfig`. The whole grid is validated before anything runs, and every
problem is reported with the file, the dotted field and (where known) the line that set it.

Identity: a run is its fully resolved config, identified by `StackWiseConfig.config_hash()`.
Two grid points that resolve to the same config (e.g. after ``--set`` pins an axis) are run
once: the later ones are dropped and a note says so.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stackwise.config.base import StackWiseConfig
from stackwise.config.errors import (
    ConfigError,
    ConfigPath,
    check_setting_path,
    dotted,
    find_path_problem,
    format_validation_error,
    raise_if_any,
    suggest,
    validation_issues,
)
from stackwise.config.loading import load_mapping, read_value

SECTIONS = ("model", "training", "data", "tracking")

# Size presets that every experiment file can use by name (and may redefine). Small trains on a
# CPU in seconds; the block counts follow 2x2 / 2x3 / 3x4 so that stack-wise training differs
# from rack-wise training at every size (it needs at least two stacks).
BUILTIN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "size": {
        "small": {
            "model": {
                "d_model": 64,
                "n_heads": 4,
                "architecture": {"n_stacks": 2, "blocks_per_stack": 2},
            }
        },
        "medium": {
            "model": {
                "d_model": 128,
                "n_heads": 4,
                "architecture": {"n_stacks": 2, "blocks_per_stack": 3},
            }
        },
        "large": {
            "model": {
                "d_model": 256,
                "n_heads": 8,
                "architecture": {"n_stacks": 3, "blocks_per_stack": 4},
            }
        },
    }
}

# Short names used in run names and `--only`; any other axis is named by its last dotted segment
# (lengthened to stay unique).
AXIS_SHORT_NAMES: dict[str, str] = {
    "training.training_architecture": "mode",
    "training.objective": "objective",
    "model.attention_type": "attention",
    "training.optimizer.lr": "lr",
    "training.budget.flops": "budget",
}
SEED_SETTING = "training.seed"

# A grid key may also be one of these short names (`mode: [layerwise, rackwise]`).
SHORT_NAME_SETTINGS: dict[str, str] = {short: key for key, short in AXIS_SHORT_NAMES.items()}

# Largest grid (points before `exclude`) that is expanded without `--max-runs`: each point is
# validated and planned before anything runs, so a typo such as a 1,000-value axis in a
# product must fail at once instead of using the machine's memory.
MAX_RUNS = 10_000

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_AXIS_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")

# Where a setting came from: a path inside the experiment file, or a description of something
# outside it (a built-in preset, a --set option).
Source: TypeAlias = ConfigPath | str


# --------------------------------------------------------------------------------------------
# the file schema
# --------------------------------------------------------------------------------------------

NonEmptyList = Annotated[list[Any], Field(min_length=1)]


class ExperimentConfig(BaseModel):
    """An experiment file: base run config, presets and the grid of runs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(
        ...,
        description="Experiment name: letters, digits, '_', '-', '.' (starting with a letter "
        "or digit). Runs are logged to the MLflow experiment of this name.",
    )
    description: str = Field("", description="What this experiment is for.")
    schema_version: Literal[1] = Field(1, description="Version of the experiment file format.")
    model: dict[str, Any] = Field(
        default_factory=dict, description="Base `model` section of every run."
    )
    training: dict[str, Any] = Field(
        default_factory=dict, description="Base `training` section of every run."
    )
    data: dict[str, Any] = Field(
        default_factory=dict, description="Base `data` section of every run."
    )
    tracking: dict[str, Any] = Field(
        default_factory=dict, description="Base `tracking` section of every run."
    )
    presets: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict,
        description="Named presets per axis, e.g. `size: {tiny: {model.d_model: 32}}`. Each "
        "preset is a set of settings (dotted keys or nested sections). Built-in: size = "
        "small, medium, large; a preset of the same name here replaces the built-in one.",
    )
    grid: dict[str, NonEmptyList] | None = Field(
        None,
        description="Axes of the grid: a dotted setting (`training.objective`) or a preset axis "
        "(`size`) -> list of values (or preset names). Every combination is one run; leave "
        "the grid out for a single run.",
    )
    zip: list[Annotated[list[str], Field(min_length=2)]] = Field(
        default_factory=list,
        description="Groups of grid axes that vary together (same length; the i-th values "
        "go into the same run) instead of forming a product.",
    )
    exclude: list[Annotated[dict[str, Any], Field(min_length=1)]] = Field(
        default_factory=list,
        description="Grid points to skip: each entry maps axes (short or dotted names) to a "
        "value; a run matching every entry of one item is left out.",
    )
    tune: dict[str, NonEmptyList] | None = Field(
        None,
        description="Settings tuned per grid point: a dotted setting -> the values to try, e.g. "
        "`training.optimizer.lr: [3.0e-4, 1.0e-3, 3.0e-3]`. Every grid point runs once per "
        "combination; `stackwise compare` shows each point at its best value (lowest "
        "validation loss averaged over seeds) and warns when that value is at the edge.",
    )
    seeds: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = Field(
        None,
        description="Replicates: every run is repeated once per seed (training.seed: "
        "initialisation and data order). Comparisons average over seeds (mean, std, n).",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _NAME_PATTERN.match(value):
            raise ValueError(
                f"must be a safe identifier (letters, digits, '_', '-', '.', starting with a "
                f"letter or digit, at most 100 characters), got {value!r}"
            )
        return value

    @field_validator("grid")
    @classmethod
    def _grid_has_axes(cls, value: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        if value is not None and not value:
            raise ValueError(
                "the grid has no axes; list at least one axis, or leave `grid` out for a single run"
            )
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            repeated = sorted({s for s in value if value.count(s) > 1})
            raise ValueError(f"each seed once; repeated: {', '.join(map(str, repeated))}")
        return value

    @field_validator("tune")
    @classmethod
    def _tune_has_settings(cls, value: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        if value is not None and not value:
            raise ValueError("`tune` has no settings; list at least one, or leave it out")
        return value

    @property
    def base(self) -> dict[str, dict[str, Any]]:
        """The base run config as written in the file (only the sections it sets)."""
        return {section: getattr(self, section) for section in SECTIONS if getattr(self, section)}


# --------------------------------------------------------------------------------------------
# loaded experiments
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """One setting: config path, value, and where it was written."""

    path: tuple[str, ...]
    value: Any
    source: Source
    # How many config path segments each of the trailing keys of `source` spans (a dotted key
    # such as `model.d_model` spans two); lets an error point at the key the user wrote.
    spans: tuple[int, ...] = ()


@dataclass(frozen=True)
class Axis:
    """One grid axis: a setting or a preset axis, with its values in file order."""

    key: str  # as written under `grid:`
    short_name: str
    is_preset: bool
    values: tuple[Any, ...]
    labels: tuple[str, ...]
    # per value: the settings it makes (a preset's settings, or the one axis setting)
    assignments: tuple[tuple[Assignment, ...], ...]
    setting: str = ""  # the dotted setting it varies (`mode` -> training.training_architecture)
    # `grid`: a coordinate of the run; `tune`: a tuned setting; `seed`: the replicate seed
    role: Literal["grid", "tune", "seed"] = "grid"

    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for n in (self.short_name, self.key, self.setting) if n))


@dataclass(frozen=True)
class RunSpec:
    """One fully resolved run of an experiment."""

    experiment_name: str
    file: Path
    name: str
    coordinates: dict[str, str]  # grid axes only
    config: StackWiseConfig
    config_hash: str
    tuned: dict[str, str] = field(default_factory=dict)  # tuned setting (short name) -> value
    seed: int | None = None  # the replicate seed, when the file lists `seeds`
    point: str = ""  # the grid point's name: the grid coordinates only

    @property
    def labels(self) -> dict[str, str]:
        """Every axis label of the run: grid coordinates, tuned values and the seed."""
        found = {**self.coordinates, **self.tuned}
        if self.seed is not None:
            found["seed"] = str(self.seed)
        return found


@dataclass
class Experiment:
    """A loaded, structurally checked experiment file (see `load_experiment`)."""

    path: Path
    config: ExperimentConfig
    lines: dict[ConfigPath, int] = field(default_factory=dict)
    number_texts: dict[ConfigPath, str] = field(default_factory=dict)  # numbers as written
    presets: dict[str, dict[str, tuple[Assignment, ...]]] = field(default_factory=dict)
    base: tuple[Assignment, ...] = ()
    axes: tuple[Axis, ...] = ()
    factors: tuple[tuple[int, ...], ...] = ()  # axes (by index) varying together
    exclusions: tuple[dict[int, int], ...] = ()  # axis index -> value index

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def file(self) -> str:
        """The path as the user gave it (used in messages)."""
        return str(self.path)

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """Line in the file of `path` (or of its nearest ancestor)."""
        key: ConfigPath = tuple(path)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return None

    def error(self, message: str, path: Sequence[str | int]) -> ConfigError:
        return ConfigError(message, file=self.file, field=dotted(path), line=self.line_of(path))

    def axis_index(self, name: str) -> int | None:
        """Index of the axis with this short name or grid key."""
        for index, axis in enumerate(self.axes):
            if name in axis.names():
                return index
        return None


def value_label(value: Any) -> str:
    """How a grid value appears in run names and is matched by `--only` and `exclude`."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _flatten(
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
            found.extend(_flatten(value, path, where, covered))
        else:
            found.append(Assignment(path, value, where, covered))
    return found


def _source_path(assignment: Assignment) -> ConfigPath | None:
    return assignment.source if isinstance(assignment.source, tuple) else None


def _check_assignments(
    experiment: Experiment, assignments: Sequence[Assignment], errors: list[ConfigError]
) -> None:
    for assignment in assignments:
        problem = find_path_problem(StackWiseConfig, assignment.path)
        if problem is None:
            continue
        where = _source_path(assignment)
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


def _short_names(keys: Sequence[str], presets: set[str]) -> list[str]:
    """Unique short names: preset axes keep their name; settings use AXIS_SHORT_NAMES or the
    last dotted segment, lengthened by more segments where two axes would collide."""
    depth = [1] * len(keys)

    def name(index: int) -> str:
        key = keys[index]
        if key in presets:
            return key
        if depth[index] == 1 and key in AXIS_SHORT_NAMES:
            return AXIS_SHORT_NAMES[key]
        return ".".join(key.split(".")[-depth[index] :])

    while True:
        names = [name(i) for i in range(len(keys))]
        clashing = [i for i, n in enumerate(names) if names.count(n) > 1]
        grown = False
        for i in clashing:
            if keys[i] not in presets and depth[i] < len(keys[i].split(".")):
                depth[i] += 1
                grown = True
        if not grown:
            return names


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
        base.extend(_flatten(tree, (section,), (section,)))
    _check_assignments(experiment, base, errors)
    experiment.base = tuple(base)

    # Presets: built-in ones, then the file's (same name replaces the built-in preset).
    presets: dict[str, dict[str, tuple[Assignment, ...]]] = {}
    for axis_name, named in BUILTIN_PRESETS.items():
        presets[axis_name] = {
            preset: tuple(_flatten(tree, (), f"built-in preset {axis_name}={preset}"))
            for preset, tree in named.items()
        }
    for axis_name, named in config.presets.items():
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
            settings = _flatten(tree, (), ("presets", axis_name, preset))
            _check_assignments(experiment, settings, errors)
            resolved[preset] = tuple(settings)
        presets[axis_name] = resolved
    experiment.presets = presets

    # Axes, in file order: the grid's, then the tuned settings, then the seeds; a short name
    # (`mode`) stands for its setting.
    entries: list[tuple[str, list[Any], ConfigPath, Literal["grid", "tune", "seed"]]] = [
        (key, values, ("grid", key), "grid") for key, values in (config.grid or {}).items()
    ]
    entries += [(key, values, ("tune", key), "tune") for key, values in (config.tune or {}).items()]
    if config.seeds is not None:
        entries.append((SEED_SETTING, list(config.seeds), ("seeds",), "seed"))
    keys = [entry[0] for entry in entries]
    grid_presets = {k for k, *_, role in entries if role == "grid" and k in presets}
    setting_keys = [k if k in grid_presets else SHORT_NAME_SETTINGS.get(k, k) for k in keys]
    short = _short_names(setting_keys, grid_presets)
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
        per_value: list[tuple[Assignment, ...]] = []
        # A number keeps the text it was written as (`budget=1.0e11`, not 100000000000.0).
        labels = [
            experiment.number_texts.get((*where, position), value_label(value))
            if isinstance(value, int | float) and not isinstance(value, bool)
            else value_label(value)
            for position, value in enumerate(values)
        ]
        if role == "tune" and key in presets:
            errors.append(
                experiment.error(
                    f"'{key}' is a preset axis; `tune` takes settings such as "
                    f"training.optimizer.lr (put preset axes under `grid`)",
                    where,
                )
            )
            continue
        if key in grid_presets:
            known = presets[key]
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
        else:
            setting = tuple(setting_key.split("."))
            problem = find_path_problem(StackWiseConfig, setting)
            if problem is not None:
                preset_axes = ", ".join(sorted(presets))
                is_last = problem.index == len(setting) - 1
                errors.append(
                    experiment.error(
                        f"{problem.message(name_in_message=not is_last)} (an axis is a dotted "
                        f"setting such as training.objective, one of the short names "
                        f"{', '.join(SHORT_NAME_SETTINGS)}, or a preset axis: {preset_axes})",
                        where,
                    )
                )
                continue
            for position, value in enumerate(values):
                if isinstance(value, dict) and value:
                    settings = _flatten(value, setting, (*where, position))
                    _check_assignments(experiment, settings, errors)
                else:
                    settings = [Assignment(setting, value, (*where, position))]
                per_value.append(tuple(settings))
        axes.append(
            Axis(
                key=key if role != "seed" else "seed",
                short_name=short_name,
                is_preset=key in grid_presets,
                values=tuple(values),
                labels=tuple(labels),
                assignments=tuple(per_value),
                setting=setting_key,
                role=role,
            )
        )
    experiment.axes = tuple(axes)
    raise_if_any(errors)

    experiment.factors = _factors(experiment, errors)
    _check_repeats(experiment, errors)
    experiment.exclusions = _exclusions(experiment, errors)
    raise_if_any(errors)
    return experiment


def _factors(experiment: Experiment, errors: list[ConfigError]) -> tuple[tuple[int, ...], ...]:
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
                errors.append(experiment.error(_unknown_axis(experiment, name), where))
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
    factors: list[tuple[int, ...]] = []
    placed: set[int] = set()
    for index in range(len(experiment.axes)):
        if index in group_of:
            group = group_of[index]
            if group not in placed:
                placed.add(group)
                factors.append(tuple(groups[group]))
        else:
            factors.append((index,))
    return tuple(factors)


def _check_repeats(experiment: Experiment, errors: list[ConfigError]) -> None:
    """A value listed twice on an axis (or a repeated combination of zipped values) would give
    two runs of the same name."""
    for factor in experiment.factors:
        axes = [experiment.axes[i] for i in factor]
        if len({len(axis.values) for axis in axes}) > 1:
            continue  # reported by _factors
        seen: dict[tuple[str, ...], int] = {}
        for position in range(len(axes[0].values)):
            labels = tuple(axis.labels[position] for axis in axes)
            if labels in seen:
                shown = ", ".join(labels)
                what = "value" if len(axes) == 1 else "combination of zipped values"
                errors.append(
                    experiment.error(
                        f"{what} {shown!r} is listed twice (also at position {seen[labels]})",
                        _value_path(axes[0], position),
                    )
                )
            else:
                seen[labels] = position


def _value_path(axis: Axis, position: int) -> ConfigPath:
    """Where value number `position` of `axis` is written in the file."""
    if axis.role == "seed":
        return ("seeds", position)
    return ("tune" if axis.role == "tune" else "grid", axis.key, position)


def _unknown_axis(experiment: Experiment, name: str) -> str:
    known = [n for axis in experiment.axes for n in dict.fromkeys(axis.names())]
    close = suggest(name, known)
    hint = f"did you mean '{close}'? " if close else ""
    listing = ", ".join(known) if known else "none (this file has no grid)"
    return f"'{name}' is not a grid axis; {hint}axes: {listing}"


def _match_value(axis: Axis, wanted: Any) -> int | None:
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
    if isinstance(number, int | float) and not isinstance(number, bool):
        for index, value in enumerate(axis.values):
            if isinstance(value, int | float) and not isinstance(value, bool) and value == number:
                return index
    return None


def _exclusions(experiment: Experiment, errors: list[ConfigError]) -> tuple[dict[int, int], ...]:
    found: list[dict[int, int]] = []
    for number, entry in enumerate(experiment.config.exclude):
        point: dict[int, int] = {}
        for name, wanted in entry.items():
            where = ("exclude", number, str(name))
            index = experiment.axis_index(str(name))
            if index is None:
                errors.append(experiment.error(_unknown_axis(experiment, str(name)), where))
                continue
            axis = experiment.axes[index]
            value = _match_value(axis, wanted)
            if value is None:
                errors.append(
                    experiment.error(
                        f"{value_label(wanted)!r} is not a value of axis '{axis.short_name}'; "
                        f"values: {', '.join(axis.labels)}",
                        where,
                    )
                )
                continue
            point[index] = value
        found.append(point)
    return tuple(found)


# --------------------------------------------------------------------------------------------
# expanding the grid
# --------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`"training.optimizer.lr=1e-3"` -> (("training", "optimizer", "lr"), 0.001).

    The value is read as YAML (`3` is an int, `1e-3` a float as in YAML 1.2, `[a, b]` a list,
    `null` None); anything else is a string, which the schema refuses where it wants a number.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text}: expected key=value, e.g. training.optimizer.lr=0.001")
    try:
        value = read_value(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return tuple(key.split(".")), value


def _parse_overrides(overrides: Sequence[str]) -> list[Assignment]:
    errors: list[ConfigError] = []
    assignments: list[Assignment] = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as error:
            errors.append(error)
            continue
        problem = check_setting_path(StackWiseConfig, path)
        if problem is not None:
            errors.append(ConfigError(problem, field=f"--set {text}"))
            continue
        if isinstance(value, dict) and value:
            assignments.extend(_flatten(value, path, f"--set {text}"))
        else:
            assignments.append(Assignment(path, value, f"--set {text}"))
    raise_if_any(errors)
    return assignments


@dataclass(frozen=True)
class _Filter:
    """One `--only key=value` condition, on an axis or on a resolved setting."""

    text: str
    key: str
    raw: str
    axis: int | None
    setting: tuple[str, ...] | None
    value: int | None = None  # index into the axis values


def _only_filters(
    experiment: Experiment, only: Sequence[str]
) -> list[tuple[str, _Filter | None, ConfigError | None]]:
    """Each `--only` text with its filter for this file, or the reason it names nothing here."""
    parsed: list[tuple[str, _Filter | None, ConfigError | None]] = []
    for text in only:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            error = ConfigError(f"--only {text}: expected key=value, e.g. mode=layerwise")
            parsed.append((text, None, error))
            continue
        index = experiment.axis_index(key)
        if index is not None:
            axis = experiment.axes[index]
            value = _match_value(axis, raw)
            if value is None:
                error = ConfigError(
                    f"--only {text}: {raw!r} is not a value of axis '{axis.short_name}'; "
                    f"values: {', '.join(axis.labels)}",
                    file=experiment.file,
                )
                parsed.append((text, None, error))
                continue
            parsed.append((text, _Filter(text, key, raw, index, None, value), None))
            continue
        setting = tuple(key.split("."))
        if check_setting_path(StackWiseConfig, setting) is None:
            parsed.append((text, _Filter(text, key, raw, None, setting), None))
            continue
        error = ConfigError(
            f"--only {text}: {_unknown_axis(experiment, key)}", file=experiment.file
        )
        parsed.append((text, None, error))
    return parsed


def only_problems(experiment: Experiment, only: Sequence[str]) -> dict[str, ConfigError]:
    """`--only` texts that name no axis value or setting of this file -> why.

    With several files, a filter may belong to some of them only (`mode=layerwise` where one
    file has no layerwise runs); it is a mistake only when no file knows it.
    """
    return {text: error for text, _, error in _only_filters(experiment, only) if error is not None}


def _parse_only(experiment: Experiment, only: Sequence[str], strict: bool = True) -> list[_Filter]:
    """The filters of `only`; unknown ones are errors, or (not `strict`) match no run."""
    errors: list[ConfigError] = []
    filters: list[_Filter] = []
    for text, item, error in _only_filters(experiment, only):
        key, sep, _ = text.partition("=")
        key = key.strip()
        if item is not None:
            filters.append(item)
        elif error is not None and (strict or not sep or not key):  # bad syntax: always wrong
            errors.append(error)
        else:
            # Matches nothing in this file; grouped with the other values of the same axis
            # (if the file has it), since filters on one key are alternatives.
            filters.append(_Filter(text, key, "", experiment.axis_index(key), None))
    raise_if_any(errors)
    return filters


def _setting_matches(config: StackWiseConfig, setting: tuple[str, ...], raw: str) -> bool:
    """Whether the run already has `setting = raw`: set it on a copy (validated, so aliases such
    as layerwise -> blockwise apply) and compare the identity hashes."""
    try:
        value = read_value(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    candidate = config.model_copy(deep=True)
    target: Any = candidate
    try:
        for part in setting[:-1]:
            target = getattr(target, part)
        if getattr(target, setting[-1]) == value:
            return True
        setattr(target, setting[-1], value)
    except (ValidationError, AttributeError, TypeError):
        return False
    return candidate.config_hash() == config.config_hash()


def _keep(filters: Sequence[_Filter], point: dict[int, int], config: StackWiseConfig) -> bool:
    """Filters on the same key are alternatives; different keys must all match."""
    # Group by what is filtered (an axis named short or dotted is the same axis).
    by_key: dict[object, list[_Filter]] = {}
    for item in filters:
        by_key.setdefault(item.axis if item.axis is not None else item.setting, []).append(item)
    for alternatives in by_key.values():
        if not any(
            point.get(item.axis) == item.value
            if item.axis is not None
            else item.setting is not None and _setting_matches(config, item.setting, item.raw)
            for item in alternatives
        ):
            return False
    return True


def _resolve(
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


@dataclass(frozen=True)
class _PointNames:
    name: str  # every label: grid coordinates, tuned values, seed
    point: str  # the grid coordinates only
    coordinates: dict[str, str]
    tuned: dict[str, str]
    seed: int | None


def _point_name(experiment: Experiment, point: dict[int, int]) -> _PointNames:
    labels: dict[str, str] = {}
    coordinates: dict[str, str] = {}
    tuned: dict[str, str] = {}
    seed: int | None = None
    for index, value in sorted(point.items()):
        axis = experiment.axes[index]
        labels[axis.short_name] = axis.labels[value]
        if axis.role == "grid":
            coordinates[axis.short_name] = axis.labels[value]
        elif axis.role == "tune":
            tuned[axis.short_name] = axis.labels[value]
        else:
            seed = int(axis.values[value])
    name = ",".join(f"{k}={v}" for k, v in labels.items()) or "default"
    point_name = ",".join(f"{k}={v}" for k, v in coordinates.items()) or "default"
    return _PointNames(name, point_name, coordinates, tuned, seed)


def grid_points(experiment: Experiment) -> list[dict[int, int]]:
    """Every grid point (axis index -> value index) in stable order, exclusions removed."""
    ranges: list[range] = []
    for factor in experiment.factors:
        ranges.append(range(len(experiment.axes[factor[0]].values)))
    points: list[dict[int, int]] = []
    for combination in itertools.product(*ranges):
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
    return math.prod(len(experiment.axes[factor[0]].values) for factor in experiment.factors)


def check_grid_size(experiment: Experiment, max_runs: int = MAX_RUNS) -> None:
    """Raise `ConfigError` when the grid has more than `max_runs` points."""
    size = grid_size(experiment)
    if size <= max_runs:
        return
    lengths = " x ".join(str(len(experiment.axes[f[0]].values)) for f in experiment.factors)
    raise ConfigError(
        f"the grid has {size:,} points ({lengths}), more than the limit of {max_runs:,}; "
        f"make it smaller, or pass --max-runs {size} to allow it",
        file=experiment.file,
        field="grid",
        line=experiment.line_of(("grid",)),
    )


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
            candidates.append((axis.assignments[position], _value_path(axis, position)))
    for assignments, value_path in candidates:
        for assignment in assignments:
            if wanted[: len(assignment.path)] != assignment.path:
                continue
            source = _source_path(assignment)
            if source is not None:
                found = experiment.line_of(source + tuple(path[len(assignment.path) :]))
            elif value_path is not None:
                found = experiment.line_of(value_path)
    return found


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
    filters: list[_Filter] = []
    try:
        extra = _parse_overrides(overrides)
    except ConfigError as error:
        problems.append(error)
    try:
        filters = _parse_only(experiment, only, strict=strict_only)
    except ConfigError as error:
        problems.append(error)
    raise_if_any(problems)
    points = grid_points(experiment)
    if not points:
        raise ConfigError(
            "`exclude` leaves no run of the grid",
            file=experiment.file,
            field="exclude",
            line=experiment.line_of(("exclude",)),
        )

    failures: dict[str, tuple[ConfigError, list[str]]] = {}
    resolved: list[tuple[_PointNames, dict[int, int], StackWiseConfig]] = []
    for point in points:
        names = _point_name(experiment, point)
        name = names.name
        assignments: list[Assignment] = list(experiment.base)
        for index in range(len(experiment.axes)):
            if index in point:
                assignments.extend(experiment.axes[index].assignments[point[index]])
        assignments.extend(extra)
        tree, provenance = _resolve(assignments)
        try:
            config = StackWiseConfig.model_validate(tree)
        except ValidationError as error:
            for issue in validation_issues(error, StackWiseConfig):
                line, note = _locate(experiment, provenance, issue.path)
                problem = ConfigError(
                    issue.message + note, file=experiment.file, field=dotted(issue.path), line=line
                )
                key = problem.format()
                failures.setdefault(key, (problem, []))[1].append(name)
            continue
        resolved.append((names, point, config))

    if failures:
        errors: list[ConfigError] = []
        for problem, failed in failures.values():
            if len(points) > 1 and len(failed) < len(points):
                shown = "; ".join(failed[:3]) + (
                    f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
                )
                label = "run" if len(failed) == 1 else "runs"
                problem = ConfigError(
                    f"{problem.message} ({label} {shown})",
                    file=problem.file,
                    field=problem.field,
                    line=problem.line,
                )
            errors.append(problem)
        raise ConfigError.combine(errors)

    runs: list[RunSpec] = []
    first_of: dict[str, str] = {}
    for names, point, config in resolved:
        if filters and not _keep(filters, point, config):
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


# --------------------------------------------------------------------------------------------
# JSON Schema for editors
# --------------------------------------------------------------------------------------------

SCHEMA_FILES = {
    "experiment.schema.json": "experiment",
    "stackwise-config.schema.json": "run",
}
_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def run_config_json_schema() -> dict[str, Any]:
    """JSON Schema of a plain run config (`StackWiseConfig`)."""
    schema = StackWiseConfig.model_json_schema()
    return {"$schema": _DRAFT, **schema}


def experiment_json_schema() -> dict[str, Any]:
    """JSON Schema of an experiment file, with the base sections typed as the run config's."""
    schema = ExperimentConfig.model_json_schema()
    run = StackWiseConfig.model_json_schema()
    definitions = schema.setdefault("$defs", {})
    definitions.update(run.get("$defs", {}))
    for section in SECTIONS:
        described = schema["properties"][section].get("description")
        reference = dict(run["properties"][section])
        if described:
            reference["description"] = described
        schema["properties"][section] = reference
    schema["$defs"] = dict(sorted(definitions.items()))
    return {"$schema": _DRAFT, **schema}


def json_schema_texts() -> dict[str, str]:
    """File name -> text of every schema file in `schemas/`."""
    builders = {"experiment": experiment_json_schema, "run": run_config_json_schema}
    return {
        filename: json.dumps(builders[kind](), indent=2, ensure_ascii=False) + "\n"
        for filename, kind in SCHEMA_FILES.items()
    }


def write_json_schemas(directory: str | Path) -> list[Path]:
    """Write the schema files; returns the paths that changed."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    changed: list[Path] = []
    for filename, text in json_schema_texts().items():
        target = folder / filename
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            changed.append(target)
    return changed


def stale_json_schemas(directory: str | Path) -> list[Path]:
    """The schema files that are missing or differ from what the code generates."""
    folder = Path(directory)
    stale: list[Path] = []
    for filename, text in json_schema_texts().items():
        target = folder / filename
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            stale.append(target)
    return stale


def count_runs(experiment: Experiment) -> int:
    """Number of grid points (before `--only`, exclusions removed)."""
    return len(grid_points(experiment))


__all__ = [
    "AXIS_SHORT_NAMES",
    "BUILTIN_PRESETS",
    "MAX_RUNS",
    "SHORT_NAME_SETTINGS",
    "Axis",
    "Experiment",
    "ExperimentConfig",
    "RunSpec",
    "check_grid_size",
    "count_runs",
    "expand_grid",
    "experiment_json_schema",
    "grid_size",
    "json_schema_texts",
    "load_experiment",
    "only_problems",
    "parse_override",
    "run_config_json_schema",
    "setting_line",
    "stale_json_schemas",
    "value_label",
    "write_json_schemas",
]
