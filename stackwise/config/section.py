"""The common behaviour of every config section (`BaseConfig`): strict keys, validated
assignment, and one number policy."""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _number_kinds(annotation: Any) -> set[type]:
    """The plain number types (int, float) an annotation such as `int | None` accepts."""
    if annotation in (int, float):
        return {annotation}
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return {a for a in typing.get_args(annotation) if a in (int, float)}
    return set()


def _item_kinds(annotation: Any) -> set[type]:
    """The number types of the items of `list[float]`, `tuple[float, float]` and the like."""
    if typing.get_origin(annotation) in (list, tuple):
        return {a for a in typing.get_args(annotation) if a in (int, float)}
    return set()


def _plain_number(value: Any, kinds: set[type]) -> Any:
    """Numbers as a user means them: a boolean is not a number, nor is a string (`'1e-3'` in
    quotes: the YAML loader reads `1e-3` unquoted as a float), an integral float (`1e6`) is a
    whole number, and `1.5` is not."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not a boolean (got {str(value).lower()})")
    if isinstance(value, str):
        raise ValueError(f"must be a number, not a string (got {value!r}); write it without quotes")
    if int not in kinds or float in kinds:
        return value  # float fields: pydantic parses; non-finite values are refused by config
    number = value
    if isinstance(number, float):
        if not math.isfinite(number):
            raise ValueError(f"must be a finite whole number, got {value}")
        if not number.is_integer():
            raise ValueError(f"must be a whole number, got {value}")
        return int(number)
    return value


class BaseConfig(BaseModel):
    """Common behaviour of every config section: strict keys, validated assignment, and one
    number policy: every float is finite, booleans are not numbers, and integer fields take
    integral floats (`max_tokens: 1e6`) but not fractional ones."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        kinds = _number_kinds(field.annotation)
        if kinds and value is not None:
            return _plain_number(value, kinds)
        items = _item_kinds(field.annotation)
        if items and isinstance(value, list | tuple):
            return type(value)(_plain_number(item, items) for item in value)
        return value

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict of this section (round-trips through `model_validate`)."""
        return self.model_dump(mode="json")
