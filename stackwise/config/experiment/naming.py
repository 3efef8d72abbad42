"""How axes, values and runs are named: axis short names, value labels and run names.

The labels are what run names are made of (``mode=rackwise,lr=0.003,seed=1``) and what
``--only`` and ``exclude`` match.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from stackwise.config.errors import ConfigPath
from stackwise.config.experiment.spec import Experiment

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


def is_number(value: Any) -> bool:
    """Whether `value` is an int or a float (a bool is neither here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def value_label(value: Any) -> str:
    """How a grid value appears in run names and is matched by `--only` and `exclude`."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def value_labels(
    values: Sequence[Any], where: ConfigPath, number_texts: dict[ConfigPath, str]
) -> tuple[str, ...]:
    """The label of each value of the axis written at `where`: `value_label`, except that a
    number keeps the text it was written as (`budget=1.0e11`, not 100000000000.0)."""
    return tuple(
        number_texts.get((*where, position), value_label(value))
        if is_number(value)
        else value_label(value)
        for position, value in enumerate(values)
    )


def short_names(keys: Sequence[str], presets: set[str]) -> list[str]:
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


@dataclass(frozen=True)
class PointNames:
    """The names of one run of the grid, and the labels they are made of."""

    name: str  # every label: grid coordinates, tuned values, seed
    point: str  # the grid coordinates only
    coordinates: dict[str, str]
    tuned: dict[str, str]
    seed: int | None


def _joined(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items()) or "default"


def point_names(experiment: Experiment, point: dict[int, int]) -> PointNames:
    """The names of the run at `point` (axis index -> value index)."""
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
    return PointNames(_joined(labels), _joined(coordinates), coordinates, tuned, seed)
