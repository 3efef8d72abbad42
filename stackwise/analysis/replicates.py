"""Replicates: summarise the seeds of one configuration as mean, spread and a t-interval.

Method:

1. Metric values that are null or NaN (failed or unfinished runs) are treated as missing; they
   never enter a mean, a standard deviation or a count.
2. `aggregate_replicates` groups the rows by the given columns (groups in order of first
   appearance) and reports per metric the mean, the sample standard deviation (ddof = 1, null
   with a single value), the standard error of the mean (std / sqrt(number of values of that
   metric)), the minimum and the maximum, plus one ``n`` column: how many rows of the group have a
   value of the first metric.
3. `format_mean_std` writes ``mean ± std (n)`` with 4 decimals, or ``mean (n)`` when there is
   no spread to show (one value, or no standard deviation).
4. `t_interval` gives the Student-t confidence interval of a mean: mean ± t_{(1+level)/2, n-1} ·
   s / sqrt(n); with fewer than two values there is no interval and the bounds are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import polars as pl

__all__ = ["aggregate_replicates", "finite_values", "format_mean_std", "t_interval"]


def _clean(column: str) -> pl.Expr:
    """The column as Float64 with NaN turned into null (a missing value)."""
    return pl.col(column).cast(pl.Float64).fill_nan(None).alias(column)


def aggregate_replicates(frame: pl.DataFrame, group: list[str], metrics: list[str]) -> pl.DataFrame:
    """One row per group of `frame` (order of first appearance) summarising each metric.

    Columns: the group columns, then for each metric ``m``: ``m_mean``, ``m_std`` (sample std,
    ddof = 1; null when the group has a single value), ``m_sem`` (``m_std`` / sqrt(number of
    values of ``m``)), ``m_min``, ``m_max``; last ``n``, the number of rows of the group with a
    value (not null, not NaN) of the first metric. An empty `group` summarises the whole frame in
    one row.
    """
    if not metrics:
        raise ValueError("aggregate_replicates needs at least one metric")
    missing = [c for c in [*group, *metrics] if c not in frame.columns]
    if missing:
        raise ValueError(f"columns not in the frame: {', '.join(missing)}")
    clean = frame.with_columns([_clean(m) for m in metrics])
    aggregations: list[pl.Expr] = []
    for metric in metrics:
        values = pl.col(metric)
        std = values.std(ddof=1)
        aggregations += [
            values.mean().alias(f"{metric}_mean"),
            std.alias(f"{metric}_std"),
            (std / values.count().cast(pl.Float64).sqrt()).alias(f"{metric}_sem"),
            values.min().alias(f"{metric}_min"),
            values.max().alias(f"{metric}_max"),
        ]
    aggregations.append(pl.col(metrics[0]).count().cast(pl.Int64).alias("n"))
    if not group:
        return clean.select(aggregations)
    return clean.group_by(group, maintain_order=True).agg(aggregations)


def _missing(value: float | None) -> bool:
    return value is None or not math.isfinite(value)


def format_mean_std(mean: float | None, std: float | None, n: int) -> str:
    """``1.2340 ± 0.0120 (3)``; ``1.2340 (1)`` with one value or no std; ``n/a (0)`` without a
    mean."""
    if mean is None or math.isnan(mean):
        return f"n/a ({n})"
    if n <= 1 or _missing(std):
        return f"{mean:.4f} ({n})"
    return f"{mean:.4f} ± {std:.4f} ({n})"


def finite_values(values: Iterable[float | None]) -> np.ndarray:
    """The finite values of `values` as a float array (None, NaN and ±inf dropped)."""
    array = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    return array[np.isfinite(array)]


def t_interval(values: Iterable[float | None], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval at `level` of the mean of the finite `values`.

    With one value the result is (value, nan, nan); with none, (nan, nan, nan).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1); got {level}")
    data = finite_values(values)
    n = data.size
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(data.mean())
    if n < 2:
        return mean, math.nan, math.nan
    sem = float(data.std(ddof=1)) / math.sqrt(n)
    from scipy import stats  # imported when an interval is made: `stackwise compare` starts fast

    half = float(stats.t.ppf((1.0 + level) / 2.0, n - 1)) * sem
    return mean, mean - half, mean + half
