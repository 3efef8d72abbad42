"""Tuned view: per grid point, keep the setting (e.g. learning rate) with the best mean
validation loss over seeds, and warn when the sweep did not bracket the optimum.

Method:

1. Rows are grouped by grid point (the `point` columns) and, inside a point, by combination of
   the tuned columns' values, both in order of first appearance.
2. Per combination the validation metric is averaged over its seeds, using only finite values:
   a failed run (null or NaN metric) never counts, and a combination without any finite value
   can never be chosen.
3. The combination with the lowest mean wins; ties go to the first in order of appearance.
   Choosing on the seed mean, not on the single best run, keeps a lucky seed from deciding.
4. The chosen rows (every seed of the winning combination, all columns) form `runs`; one row
   per point in `choices` records the chosen values, the number of seeds with a value, the
   chosen mean, how many combinations were tried and whether a numeric choice lies at the edge
   of the values tried (all values tried at that point count, failed ones included).
5. Warnings: a numeric choice at the smallest or largest value tried (the optimum may lie
   outside the sweep), a chosen combination with failed seeds (its mean rests on fewer runs),
   and a point where nothing can be chosen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

__all__ = ["TunedSelection", "format_value", "point_label", "select_tuned"]


@dataclass(frozen=True)
class TunedSelection:
    """The tuned view of a sweep (see the module docstring).

    `runs`: the rows of the chosen combinations (all seeds, all columns, original order).
    `choices`: one row per grid point with the point columns, the chosen tuned values, ``n``
    (seeds with a finite metric), ``<metric>_mean`` (the chosen mean), ``candidates`` (number of
    combinations tried) and ``at_edge``. `warnings`: plain sentences.
    """

    runs: pl.DataFrame
    choices: pl.DataFrame
    warnings: list[str] = field(default_factory=list)
    point: list[str] = field(default_factory=list)
    tuned: list[str] = field(default_factory=list)
    metric: str = "val_loss"


def format_value(value: Any) -> str:
    """A compact, deterministic text for a setting's value: ``4e12``, ``0.003``, ``rackwise``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and abs(value) < 100_000:
        return str(value)
    if isinstance(value, (int, float)):
        text = f"{float(value):.4g}"
        return text.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")
    return str(value)


def point_label(names: Sequence[str], values: Sequence[Any]) -> str:
    """``mode=rackwise,budget=4e12`` (a single ``point`` column already holds such a label)."""
    if list(names) == ["point"]:
        return format_value(values[0])
    return ",".join(f"{n}={format_value(v)}" for n, v in zip(names, values, strict=True))


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def select_tuned(
    frame: pl.DataFrame,
    point: list[str],
    tuned: list[str],
    seed: str = "seed",
    metric: str = "val_loss",
) -> TunedSelection:
    """Per grid point, the tuned combination with the lowest seed-averaged `metric`.

    `point`: the columns that identify a grid point (e.g. mode, budget). `tuned`: the columns
    swept for tuning (e.g. ``training.optimizer.lr``). `seed` names the replicate column (it is
    only required to exist). See the module docstring for the rules.
    """
    missing = [c for c in [*point, *tuned, seed, metric] if c not in frame.columns]
    if missing:
        raise ValueError(f"columns not in the frame: {', '.join(missing)}")
    overlap = set(point) & set(tuned)
    if overlap:
        raise ValueError(f"columns both in point and tuned: {', '.join(sorted(overlap))}")

    keys = frame.select([*point, *tuned]).rows()
    metric_values = frame.get_column(metric).to_list()
    n_point = len(point)

    # point key -> combination key -> finite metric values (insertion order = first appearance)
    groups: dict[tuple[Any, ...], dict[tuple[Any, ...], list[float]]] = {}
    for key, value in zip(keys, metric_values, strict=True):
        point_key, combo_key = tuple(key[:n_point]), tuple(key[n_point:])
        combos = groups.setdefault(point_key, {})
        values = combos.setdefault(combo_key, [])
        finite = _finite(value)
        if finite is not None:
            values.append(finite)
    counts: dict[tuple[Any, ...], int] = {}
    for key in keys:
        counts[tuple(key)] = counts.get(tuple(key), 0) + 1

    warnings: list[str] = []
    choice_rows: list[tuple[Any, ...]] = []
    chosen_keys: set[tuple[Any, ...]] = set()
    for point_key, combos in groups.items():
        label = point_label(point, point_key) if point else "(all rows)"
        best: tuple[Any, ...] | None = None
        best_mean = math.inf
        for combo_key, values in combos.items():
            if not values:
                continue
            mean = math.fsum(values) / len(values)
            if mean < best_mean:
                best, best_mean = combo_key, mean
        if best is None:
            warnings.append(
                f"point {label}: no finite {metric} in any of the {len(combos)} "
                "combinations tried; nothing chosen"
            )
            continue
        chosen_keys.add((*point_key, *best))
        at_edge = False
        for index, column in enumerate(tuned):
            if not frame.schema[column].is_numeric():
                continue
            tried = sorted({c[index] for c in combos if c[index] is not None})
            chosen = best[index]
            if len(tried) < 2 or chosen is None:
                continue
            side = "smallest" if chosen == tried[0] else "largest" if chosen == tried[-1] else ""
            if side:
                at_edge = True
                listed = ", ".join(format_value(v) for v in tried)
                warnings.append(
                    f"point {label}: best {column} = {format_value(chosen)} is the {side} "
                    f"value tried ({listed}); extend the sweep"
                )
        n_values = len(combos[best])
        n_rows = counts[(*point_key, *best)]
        if n_values < n_rows:
            warnings.append(
                f"point {label}: the chosen combination has failed runs ({n_rows - n_values} "
                f"of {n_rows} without a finite {metric}); its mean rests on {n_values}"
            )
        choice_rows.append((*point_key, *best, n_values, best_mean, len(combos), at_edge))

    mask = [tuple(key) in chosen_keys for key in keys]
    runs = frame.filter(pl.Series("chosen", mask, dtype=pl.Boolean))
    schema: dict[str, Any] = {c: frame.schema[c] for c in [*point, *tuned]}
    schema |= {
        "n": pl.Int64,
        f"{metric}_mean": pl.Float64,
        "candidates": pl.Int64,
        "at_edge": pl.Boolean,
    }
    choices = pl.DataFrame(choice_rows, schema=schema, orient="row")
    return TunedSelection(
        runs=runs,
        choices=choices,
        warnings=warnings,
        point=list(point),
        tuned=list(tuned),
        metric=metric,
    )
