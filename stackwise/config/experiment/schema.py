"""The experiment file's schema: its fields (`ExperimentConfig`) and the built-in presets."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

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
