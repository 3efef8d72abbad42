"""``--set key=value``: settings given on the command line, applied to every run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from stackwise.config.base import StackWiseConfig
from stackwise.config.errors import ConfigError, check_setting_path, raise_if_any
from stackwise.config.experiment.settings import Assignment, settings_at
from stackwise.config.loading import read_value


def split_key_value(text: str) -> tuple[str, str] | None:
    """`"key = value"` -> ("key", " value"): the key stripped, the value as written; None when
    `text` has no `=` or no key."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        return None
    return key, raw


def read_setting_value(raw: str) -> Any:
    """A command-line value read as YAML (`3` is an int, `1e-3` a float as in YAML 1.2, `[a, b]`
    a list, `null` None); empty or not YAML, it is the text itself."""
    try:
        return read_value(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`"training.optimizer.lr=1e-3"` -> (("training", "optimizer", "lr"), 0.001).

    The value is read as YAML (`3` is an int, `1e-3` a float as in YAML 1.2, `[a, b]` a list,
    `null` None); anything else is a string, which the schema refuses where it wants a number.
    """
    parts = split_key_value(text)
    if parts is None:
        raise ConfigError(f"--set {text}: expected key=value, e.g. training.optimizer.lr=0.001")
    key, raw = parts
    return tuple(key.split(".")), read_setting_value(raw)


def parse_overrides(overrides: Sequence[str]) -> list[Assignment]:
    """The settings of every `--set` text, in order; all bad ones raised together."""
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
        assignments.extend(settings_at(path, value, f"--set {text}"))
    raise_if_any(errors)
    return assignments
