"""``--only key=value``: which runs of a grid to keep, by axis value or by resolved setting.

Filters on the same key are alternatives (``--only mode=layerwise --only mode=rackwise``);
filters on different keys must all match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from stackwise.config.base import StackWiseConfig
from stackwise.config.errors import ConfigError, check_setting_path, raise_if_any
from stackwise.config.experiment.grid import match_value, not_a_value, unknown_axis
from stackwise.config.experiment.overrides import read_setting_value, split_key_value
from stackwise.config.experiment.spec import Experiment


@dataclass(frozen=True)
class Filter:
    """One `--only key=value` condition, on an axis or on a resolved setting."""

    raw: str
    axis: int | None
    setting: tuple[str, ...] | None
    value: int | None = None  # index into the axis values


def _only_filters(
    experiment: Experiment, only: Sequence[str]
) -> list[tuple[str, str, Filter | ConfigError]]:
    """Each `--only` text with its key ("" when it is not key=value) and its filter for this
    file, or the reason it names nothing here."""
    parsed: list[tuple[str, str, Filter | ConfigError]] = []
    for text in only:
        parts = split_key_value(text)
        if parts is None:
            error = ConfigError(f"--only {text}: expected key=value, e.g. mode=layerwise")
            parsed.append((text, "", error))
            continue
        key, raw = parts
        index = experiment.axis_index(key)
        if index is not None:
            axis = experiment.axes[index]
            value = match_value(axis, raw)
            if value is None:
                error = ConfigError(
                    f"--only {text}: {not_a_value(axis, raw)}", file=experiment.file
                )
                parsed.append((text, key, error))
            else:
                parsed.append((text, key, Filter(raw, index, None, value)))
            continue
        setting = tuple(key.split("."))
        if check_setting_path(StackWiseConfig, setting) is None:
            parsed.append((text, key, Filter(raw, None, setting)))
            continue
        error = ConfigError(f"--only {text}: {unknown_axis(experiment, key)}", file=experiment.file)
        parsed.append((text, key, error))
    return parsed


def only_problems(experiment: Experiment, only: Sequence[str]) -> dict[str, ConfigError]:
    """`--only` texts that name no axis value or setting of this file -> why.

    With several files, a filter may belong to some of them only (`mode=layerwise` where one
    file has no layerwise runs); it is a mistake only when no file knows it.
    """
    return {
        text: found
        for text, _, found in _only_filters(experiment, only)
        if isinstance(found, ConfigError)
    }


def parse_only(experiment: Experiment, only: Sequence[str], strict: bool = True) -> list[Filter]:
    """The filters of `only`; unknown ones are errors, or (not `strict`) match no run."""
    errors: list[ConfigError] = []
    filters: list[Filter] = []
    for _, key, found in _only_filters(experiment, only):
        if isinstance(found, Filter):
            filters.append(found)
        elif strict or not key:  # bad syntax: always wrong
            errors.append(found)
        else:
            # Matches nothing in this file; grouped with the other values of the same axis
            # (if the file has it), since filters on one key are alternatives.
            filters.append(Filter("", experiment.axis_index(key), None))
    raise_if_any(errors)
    return filters


def _setting_matches(config: StackWiseConfig, setting: tuple[str, ...], raw: str) -> bool:
    """Whether the run already has `setting = raw`: set it on a copy (validated, so aliases such
    as layerwise -> blockwise apply) and compare the identity hashes."""
    value = read_setting_value(raw)
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


def keep(filters: Sequence[Filter], point: dict[int, int], config: StackWiseConfig) -> bool:
    """Whether the run at `point` with `config` passes `filters`: filters on the same key are
    alternatives; different keys must all match."""
    # Group by what is filtered (an axis named short or dotted is the same axis).
    by_key: dict[object, list[Filter]] = {}
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
