"""Frontier points (per mode and budget the seed statistics of a metric) and the check that
no run repeated its training data too often."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import polars as pl

from stackwise.analysis.replicates import aggregate_replicates


def _first_appearance(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def frontier_points(
    frame: pl.DataFrame,
    mode: str = "mode",
    budget: str = "budget",
    seed: str = "seed",
    metric: str = "test_loss",
) -> pl.DataFrame:
    """Per mode and budget the seed statistics of `metric`.

    Columns: ``mode``, ``budget`` (Float64), ``mean``, ``std`` (sample, null for one seed),
    ``n`` (seeds with a finite value), and ``flops`` (mean executed FLOPs) when `frame` has a
    ``flops`` column. Modes in order of first appearance, budgets ascending. `seed` is only
    checked to exist: each row is one seed.
    """
    missing = [c for c in (mode, budget, seed, metric) if c not in frame.columns]
    if missing:
        raise ValueError(f"columns not in the frame: {', '.join(missing)}")
    metrics = [metric] + (["flops"] if "flops" in frame.columns and metric != "flops" else [])
    summary = aggregate_replicates(frame, [mode, budget], metrics)
    order = {m: i for i, m in enumerate(_first_appearance(frame.get_column(mode).to_list()))}
    columns = [
        pl.col(mode).cast(pl.String).alias("mode"),
        pl.col(budget).cast(pl.Float64).alias("budget"),
        pl.col(f"{metric}_mean").alias("mean"),
        pl.col(f"{metric}_std").alias("std"),
        pl.col("n"),
    ]
    if len(metrics) == 2:
        columns.append(pl.col("flops_mean").alias("flops"))
    return (
        summary.with_columns(
            pl.col(mode).replace_strict(order, return_dtype=pl.Int64).alias("__order")
        )
        .sort(["__order", budget])
        .select(columns)
    )


def epoch_warnings(
    frame: pl.DataFrame, column: str = "epochs", limit: float = 4.0, name_column: str = "run"
) -> list[str]:
    """One line per run whose `column` (passes over the training data) exceeds `limit`.

    No `column` in the frame: no warnings. Without `name_column` runs are named by row number.
    """
    if column not in frame.columns:
        return []
    names = (
        frame.get_column(name_column).to_list()
        if name_column in frame.columns
        else [f"row {i}" for i in range(frame.height)]
    )
    lines: list[str] = []
    for name, epochs in zip(names, frame.get_column(column).to_list(), strict=True):
        if epochs is None:
            continue
        value = float(epochs)
        if math.isfinite(value) and value > limit:
            lines.append(
                f"run {name}: {value:.2f} epochs over the training data, above the limit of "
                f"{limit:g}; its loss was reached on repeated data"
            )
    return lines
