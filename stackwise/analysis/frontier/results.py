"""What `analyse_frontier` computes: the fits, paired gaps, multipliers and crossovers as plain
numbers (`FrontierAnalysis`), and as polars tables (`FrontierAnalysis.to_frames`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from stackwise.analysis.frontier.fit import PowerLawFit


@dataclass(frozen=True)
class ModeFit:
    """The power-law fit of one mode's seed means, or the reason there is none."""

    mode: str
    fit: PowerLawFit | None
    reason: str | None
    budgets: int


@dataclass(frozen=True)
class PairedGap:
    """mode − reference at one budget, paired by seed: mean and Student-t interval (`level`)."""

    mode: str
    reference: str
    budget: float
    mean: float
    low: float
    high: float
    n: int
    level: float


@dataclass(frozen=True)
class Multiplier:
    """Compute the mode needs for the reference's fitted loss at `budget`, over `budget`.

    `value` is None when the mode's fitted curve never reaches that loss. `low`/`high`: the
    bootstrap percentile interval (NaN without one); `defined`: the fraction of resamples in
    which the multiplier existed (NaN without a bootstrap).
    """

    mode: str
    reference: str
    budget: float
    value: float | None
    low: float
    high: float
    defined: float
    level: float


@dataclass(frozen=True)
class Crossover:
    """Budget where the fitted curves of `mode` and `reference` meet (None: not in the search
    range `search_low`–`search_high`); `inside` says whether it lies in the common measured range
    `measured_low`–`measured_high`. Interval and `defined` as in `Multiplier`."""

    mode: str
    reference: str
    budget: float | None
    inside: bool | None
    low: float
    high: float
    defined: float
    level: float
    measured_low: float
    measured_high: float
    search_low: float
    search_high: float


# The tables of `FrontierAnalysis.to_frames`, each named after the field whose items are its
# rows: per column the attribute it is read from (a dotted path; null past a missing fit) and
# its polars type.
_TABLES: dict[str, dict[str, tuple[str, type[pl.DataType]]]] = {
    "fits": {
        "mode": ("mode", pl.String),
        "budgets": ("budgets", pl.Int64),
        "E": ("fit.E", pl.Float64),
        "A": ("fit.A", pl.Float64),
        "alpha": ("fit.alpha", pl.Float64),
        "rmse": ("fit.rmse", pl.Float64),
        "n_points": ("fit.n_points", pl.Int64),
        "reason": ("reason", pl.String),
    },
    "gaps": {
        "mode": ("mode", pl.String),
        "reference": ("reference", pl.String),
        "budget": ("budget", pl.Float64),
        "mean": ("mean", pl.Float64),
        "low": ("low", pl.Float64),
        "high": ("high", pl.Float64),
        "n": ("n", pl.Int64),
    },
    "multipliers": {
        "mode": ("mode", pl.String),
        "reference": ("reference", pl.String),
        "budget": ("budget", pl.Float64),
        "multiplier": ("value", pl.Float64),
        "low": ("low", pl.Float64),
        "high": ("high", pl.Float64),
        "defined": ("defined", pl.Float64),
    },
    "crossovers": {
        "mode": ("mode", pl.String),
        "reference": ("reference", pl.String),
        "crossover": ("budget", pl.Float64),
        "inside": ("inside", pl.Boolean),
        "low": ("low", pl.Float64),
        "high": ("high", pl.Float64),
        "defined": ("defined", pl.Float64),
        "measured_low": ("measured_low", pl.Float64),
        "measured_high": ("measured_high", pl.Float64),
    },
}


def _attribute(item: Any, path: str) -> Any:
    """The attribute at dotted `path` of `item`; None where a step on the way is None."""
    for name in path.split("."):
        if item is None:
            return None
        item = getattr(item, name)
    return item


@dataclass(frozen=True)
class FrontierAnalysis:
    """Everything `analyse_frontier` computes, as plain numbers; `to_frames()` for tables."""

    reference: str
    metric: str
    level: float
    n_boot: int
    n_seeds: int
    fits: tuple[ModeFit, ...]
    gaps: tuple[PairedGap, ...]
    multipliers: tuple[Multiplier, ...]
    crossovers: tuple[Crossover, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def fit_for(self, mode: str) -> PowerLawFit | None:
        """The fit of `mode` (None when it has none or is unknown)."""
        for item in self.fits:
            if item.mode == mode:
                return item.fit
        return None

    def fits_by_mode(self) -> dict[str, PowerLawFit | None]:
        return {item.mode: item.fit for item in self.fits}

    def to_frames(self) -> dict[str, pl.DataFrame]:
        """Tables ``fits``, ``gaps``, ``multipliers`` and ``crossovers`` (polars, plain types)."""
        return {
            name: pl.DataFrame(
                [
                    tuple(_attribute(item, path) for path, _ in columns.values())
                    for item in getattr(self, name)
                ],
                schema={column: dtype for column, (_, dtype) in columns.items()},
                orient="row",
            )
            for name, columns in _TABLES.items()
        }
