"""A loaded experiment: its axes (`Axis`), the checked file (`Experiment`) and its runs
(`RunSpec`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

from stackwise.config.base import StackWiseConfig
from stackwise.config.errors import ConfigError, ConfigPath, dotted, line_of
from stackwise.config.experiment.schema import ExperimentConfig
from stackwise.config.experiment.settings import Assignment

# What an axis varies: `grid` a coordinate of the run, `tune` a tuned setting, `seed` the
# replicate seed.
Role: TypeAlias = Literal["grid", "tune", "seed"]


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
    role: Role = "grid"

    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for n in (self.short_name, self.key, self.setting) if n))

    def value_path(self, position: int) -> ConfigPath:
        """Where value number `position` is written in the file."""
        if self.role == "seed":
            return ("seeds", position)
        return ("tune" if self.role == "tune" else "grid", self.key, position)


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

    @property
    def title(self) -> str:
        """The run's display name in MLflow (`display_name` of its labels)."""
        return display_name(self.labels)


_LITERALS = {"true", "false", "null", "~"}


def _is_word(label: str) -> bool:
    """Whether a label reads on its own (``layerwise``, ``small``), unlike a number, a
    literal or a structured value, which need their axis name beside them."""
    if not label or label.lower() in _LITERALS or label[0] in "[{" or "=" in label:
        return False
    try:
        float(label)
    except ValueError:
        return True
    return False


def display_name(labels: dict[str, str]) -> str:
    """A short run name that shows first what tells runs apart: the mode, then the other
    labels in axis order, joined by `` · ``; a word stands alone (``layerwise · small``), a
    number or literal keeps its axis (``lr=0.003``, ``seed=1``). The full name
    (``size=small,mode=layerwise``) stays the run's ``stackwise.run_name`` tag."""
    ordered = sorted(labels.items(), key=lambda item: item[0] != "mode")
    parts = [
        value if key != "seed" and _is_word(value) else f"{key}={value}" for key, value in ordered
    ]
    return " · ".join(parts) or "default"


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
        return line_of(self.lines, path)

    def error(self, message: str, path: Sequence[str | int]) -> ConfigError:
        return ConfigError(message, file=self.file, field=dotted(path), line=self.line_of(path))

    def axis_index(self, name: str) -> int | None:
        """Index of the axis with this short name or grid key."""
        for index, axis in enumerate(self.axes):
            if name in axis.names():
                return index
        return None
