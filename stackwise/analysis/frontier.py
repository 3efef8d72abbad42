"""Compute frontier: loss against compute per training mode, fitted power laws, paired gaps,
compute multipliers and crossovers, with intervals over seeds.

Method:

1. Power law. Each mode's loss is modelled as L(C) = E + A·C^(−α) with E ≥ 0, A > 0, α > 0.
   The fit works with x = C / C₀, C₀ the geometric mean of the budgets, so that the numbers
   stay well conditioned (C ~ 1e12 would otherwise make A ~ 1e5 and its gradient tiny). For a
   fixed α the model is linear in (E, a), solved exactly under the constraints; the resulting
   profile over a log grid of α supplies starting points (its local minima), each refined by
   `scipy.optimize.least_squares` on (E, ln a, α) with the analytic Jacobian (Levenberg-
   Marquardt, or the bounded trust-region method when that step leaves E ≥ 0 and
   α ∈ [0.001, 4]); the best sum of squares, starting points included, wins.
   The reported A is for the un-normalised C: A = a · C₀^α. Fewer than 3 distinct budgets, or
   losses that do not decrease with compute at all, give no fit (None), never an exception.
2. Frontier points: per mode and budget the mean, sample std and count over seeds of the
   metric (failed runs, null or NaN, ignored) and the mean executed FLOPs when recorded.
3. Paired gaps: per non-reference mode and budget, the differences mode − reference on the
   same seed (seeds measured in both only) with their mean and a Student-t interval. A
   bootstrap percentile interval is not used here: with 3–5 seeds it can only span the
   observed differences and is far too narrow.
4. Compute multiplier at each reference budget C: mode.compute_for(ref.predict(C)) / C, how
   many times the reference's compute the mode needs to reach the reference's fitted loss at C
   (> 1: the mode needs more compute). Crossover: the budget where the two fitted curves meet,
   searched on a log grid from the common measured range / 10 to × 10 and refined by root
   finding; None when they do not meet there, flagged when inside the measured range.
5. Intervals for multipliers and crossovers: seeds are resampled with replacement (one
   resampled seed list shared by every mode, so the pairing is kept), per-budget seed means
   recomputed, every mode refitted and the quantity recomputed; the percentile interval is
   taken over the resamples where the quantity exists, and that fraction is reported. The same
   caveat as in 3. applies: with n seeds there are only C(2n−1, n) distinct resamples (10 for 3
   seeds), so these intervals are rough and tend to be too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import polars as pl
from numpy.typing import NDArray

from stackwise.analysis.replicates import aggregate_replicates, t_interval

__all__ = [
    "Crossover",
    "FrontierAnalysis",
    "ModeFit",
    "Multiplier",
    "PairedGap",
    "PowerLawFit",
    "analyse_frontier",
    "epoch_warnings",
    "fit_power_law",
    "fit_power_law_or_reason",
    "frontier_points",
]

FloatArray = NDArray[np.float64]

ALPHA_MIN = 1e-3
ALPHA_MAX = 4.0
_ALPHA_GRID = np.geomspace(ALPHA_MIN, ALPHA_MAX, 80)
_MAX_STARTS = 3
_CROSSOVER_GRID = 400


# --------------------------------------------------------------------------------------------
# power law
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLawFit:
    """L(C) = E + A·C^(−α), C in FLOPs (A is for the un-normalised C).

    `rmse`: root mean squared residual over the fitted points, in loss units; `n_points`:
    number of (C, L) pairs fitted.
    """

    E: float
    A: float
    alpha: float
    rmse: float
    n_points: int

    @overload
    def predict(self, compute: float) -> float: ...

    @overload
    def predict(self, compute: FloatArray) -> FloatArray: ...

    def predict(self, compute: float | FloatArray) -> float | FloatArray:
        """The fitted loss at `compute` FLOPs (a float or an array)."""
        if isinstance(compute, np.ndarray):
            c = compute.astype(float)
            return self.E + np.exp(math.log(self.A) - self.alpha * np.log(c))
        return self.E + math.exp(math.log(self.A) - self.alpha * math.log(compute))

    def compute_for(self, loss: float) -> float | None:
        """The compute at which the fitted curve reaches `loss`; None when loss ≤ E (never)."""
        if not math.isfinite(loss) or loss <= self.E:
            return None
        log_c = (math.log(self.A) - math.log(loss - self.E)) / self.alpha
        if log_c > 700.0:
            return None
        return math.exp(log_c)


def _profile(x: FloatArray, y: FloatArray, alphas: FloatArray) -> tuple[FloatArray, ...]:
    """For each α, the constrained (E ≥ 0, a ≥ 0) least-squares (E, a) and its sum of squares."""
    with np.errstate(over="ignore"):
        z = x[None, :] ** -alphas[:, None]
    n = float(y.size)
    sz, szz = z.sum(axis=1), (z * z).sum(axis=1)
    sy, szy = float(y.sum()), (z * y).sum(axis=1)

    def sse(e: FloatArray, a: FloatArray) -> FloatArray:
        residual = y[None, :] - e[:, None] - a[:, None] * z
        return np.asarray((residual * residual).sum(axis=1), dtype=float)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        det = n * szz - sz * sz
        a_free = (n * szy - sz * sy) / det
        e_free = (sy - a_free * sz) / n
        free_ok = np.isfinite(a_free) & np.isfinite(e_free) & (a_free > 0) & (e_free >= 0)
        a_zero_e = np.maximum(szy / szz, 0.0)
    e_flat = np.full_like(alphas, max(sy / n, 0.0))
    zeros = np.zeros_like(alphas)
    options = [
        (np.where(free_ok, e_free, 0.0), np.where(free_ok, a_free, 0.0), free_ok),
        (zeros, np.nan_to_num(a_zero_e), np.isfinite(a_zero_e)),
        (e_flat, zeros, np.ones_like(free_ok)),
    ]
    best_e, best_a = e_flat.copy(), zeros.copy()
    best_sse = np.full_like(alphas, np.inf)
    for e, a, ok in options:
        s = np.where(ok, sse(e, a), np.inf)
        better = s < best_sse
        best_e, best_a, best_sse = (
            np.where(better, e, best_e),
            np.where(better, a, best_a),
            np.where(better, s, best_sse),
        )
    return best_e, best_a, best_sse


def _starts(sse: FloatArray) -> list[int]:
    """Indices of the profile's local minima, best first (at most `_MAX_STARTS`)."""
    k = sse.size
    minima = [
        i
        for i in range(k)
        if np.isfinite(sse[i])
        and (i == 0 or sse[i] <= sse[i - 1])
        and (i == k - 1 or sse[i] <= sse[i + 1])
    ]
    minima.sort(key=lambda i: float(sse[i]))
    return minima[:_MAX_STARTS]


def fit_power_law_or_reason(
    compute: Sequence[float] | FloatArray, loss: Sequence[float] | FloatArray
) -> tuple[PowerLawFit | None, str | None]:
    """`fit_power_law` that also says why there is no fit: (fit, None) or (None, reason)."""
    c = np.asarray(compute, dtype=float).ravel()
    y = np.asarray(loss, dtype=float).ravel()
    if c.size != y.size:
        return None, f"{c.size} budgets but {y.size} losses"
    keep = np.isfinite(c) & np.isfinite(y) & (c > 0)
    c, y = c[keep], y[keep]
    distinct = np.unique(c).size
    if distinct < 3:
        return None, f"{distinct} budget{'s' if distinct != 1 else ''}: a fit needs at least 3"
    log_c0 = float(np.log(c).mean())
    x = np.exp(np.log(c) - log_c0)

    e_grid, a_grid, sse_grid = _profile(x, y, _ALPHA_GRID)
    best: tuple[float, float, float, float] | None = None  # (sse, E, ln a, alpha)

    log_x = np.log(x)
    lower, upper = np.array([0.0, -np.inf, ALPHA_MIN]), np.array([np.inf, np.inf, ALPHA_MAX])

    def residual(p: FloatArray) -> FloatArray:
        return np.asarray(p[0] + np.exp(p[1] - p[2] * log_x) - y, dtype=float)

    def jacobian(p: FloatArray) -> FloatArray:
        term = np.exp(p[1] - p[2] * log_x)
        return np.column_stack([np.ones_like(term), term, -log_x * term])

    def feasible(p: FloatArray) -> bool:
        return bool(np.all(np.isfinite(p)) and np.all(p >= lower) and np.all(p <= upper))

    from scipy import optimize  # imported when a fit is made: `stackwise compare` starts fast

    def refine(start: FloatArray) -> tuple[float, float, float, float] | None:
        """The least-squares fit from `start`, or None where the solver cannot use it."""
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                # Levenberg-Marquardt first (fast); the bounded method when it leaves the bounds
                result = optimize.least_squares(residual, start, jac=jacobian, method="lm")
                if not feasible(result.x):
                    result = optimize.least_squares(
                        residual, start, jac=jacobian, bounds=(lower, upper), x_scale="jac"
                    )
            except (ValueError, np.linalg.LinAlgError):
                return None
        if not (feasible(result.x) and math.isfinite(result.cost)):
            return None
        e, log_a, alpha = (float(v) for v in result.x)
        return 2.0 * float(result.cost), e, log_a, alpha

    for i in _starts(sse_grid):
        if a_grid[i] <= 0:
            continue
        start = np.array(
            [max(float(e_grid[i]), 0.0), math.log(float(a_grid[i])), float(_ALPHA_GRID[i])]
        )
        # the grid start stays a candidate when the solver cannot improve on it
        candidates = [(float(sse_grid[i]), float(start[0]), float(start[1]), float(start[2]))]
        refined = refine(start)
        if refined is not None:
            candidates.append(refined)
        for candidate in candidates:
            if best is None or candidate[0] < best[0]:
                best = candidate
    if best is None:
        return None, "the loss does not decrease with compute; no fit with A > 0"
    sse, e, log_a, alpha = best
    log_big_a = log_a + alpha * log_c0
    if not math.isfinite(log_big_a) or log_big_a > 700.0:
        return None, "the fitted A overflows"
    fit = PowerLawFit(
        E=e,
        A=math.exp(log_big_a),
        alpha=alpha,
        rmse=math.sqrt(max(sse, 0.0) / y.size),
        n_points=int(y.size),
    )
    return fit, None


def fit_power_law(
    compute: Sequence[float] | FloatArray, loss: Sequence[float] | FloatArray
) -> PowerLawFit | None:
    """Least-squares fit of L(C) = E + A·C^(−α) (see the module docstring, step 1).

    Pairs with a non-finite value or C ≤ 0 are dropped. Returns None, never raises, with fewer
    than 3 distinct budgets or when the losses do not decrease with compute.
    """
    return fit_power_law_or_reason(compute, loss)[0]


# --------------------------------------------------------------------------------------------
# frontier points
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------------


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
        fits = pl.DataFrame(
            [
                (
                    f.mode,
                    f.budgets,
                    f.fit.E if f.fit else None,
                    f.fit.A if f.fit else None,
                    f.fit.alpha if f.fit else None,
                    f.fit.rmse if f.fit else None,
                    f.fit.n_points if f.fit else None,
                    f.reason,
                )
                for f in self.fits
            ],
            schema={
                "mode": pl.String,
                "budgets": pl.Int64,
                "E": pl.Float64,
                "A": pl.Float64,
                "alpha": pl.Float64,
                "rmse": pl.Float64,
                "n_points": pl.Int64,
                "reason": pl.String,
            },
            orient="row",
        )
        gaps = pl.DataFrame(
            [(g.mode, g.reference, g.budget, g.mean, g.low, g.high, g.n) for g in self.gaps],
            schema={
                "mode": pl.String,
                "reference": pl.String,
                "budget": pl.Float64,
                "mean": pl.Float64,
                "low": pl.Float64,
                "high": pl.Float64,
                "n": pl.Int64,
            },
            orient="row",
        )
        multipliers = pl.DataFrame(
            [
                (m.mode, m.reference, m.budget, m.value, m.low, m.high, m.defined)
                for m in self.multipliers
            ],
            schema={
                "mode": pl.String,
                "reference": pl.String,
                "budget": pl.Float64,
                "multiplier": pl.Float64,
                "low": pl.Float64,
                "high": pl.Float64,
                "defined": pl.Float64,
            },
            orient="row",
        )
        crossovers = pl.DataFrame(
            [
                (
                    c.mode,
                    c.reference,
                    c.budget,
                    c.inside,
                    c.low,
                    c.high,
                    c.defined,
                    c.measured_low,
                    c.measured_high,
                )
                for c in self.crossovers
            ],
            schema={
                "mode": pl.String,
                "reference": pl.String,
                "crossover": pl.Float64,
                "inside": pl.Boolean,
                "low": pl.Float64,
                "high": pl.Float64,
                "defined": pl.Float64,
                "measured_low": pl.Float64,
                "measured_high": pl.Float64,
            },
            orient="row",
        )
        return {
            "fits": fits,
            "gaps": gaps,
            "multipliers": multipliers,
            "crossovers": crossovers,
        }


def _multiplier(mode_fit: PowerLawFit, ref_fit: PowerLawFit, budget: float) -> float | None:
    needed = mode_fit.compute_for(ref_fit.predict(budget))
    return None if needed is None else needed / budget


def _crossover(
    mode_fit: PowerLawFit, ref_fit: PowerLawFit, low: float, high: float
) -> float | None:
    """Smallest budget in [low, high] where the two fitted curves meet, or None."""
    from scipy import optimize

    grid = np.linspace(math.log(low), math.log(high), _CROSSOVER_GRID)

    def difference(log_c: float) -> float:
        c = math.exp(log_c)
        return mode_fit.predict(c) - ref_fit.predict(c)

    values = mode_fit.predict(np.exp(grid)) - ref_fit.predict(np.exp(grid))
    for i in range(grid.size - 1):
        if values[i] == 0.0:
            return float(math.exp(grid[i]))
        if values[i] * values[i + 1] < 0.0:
            root = optimize.brentq(difference, float(grid[i]), float(grid[i + 1]), xtol=1e-12)
            return float(math.exp(root))
    if values[-1] == 0.0:
        return float(math.exp(grid[-1]))
    return None


def _percentile(samples: list[float], n_total: int, level: float) -> tuple[float, float, float]:
    """(low, high, fraction defined) of the bootstrap samples that exist."""
    if n_total == 0:
        return math.nan, math.nan, math.nan
    fraction = len(samples) / n_total
    if not samples:
        return math.nan, math.nan, fraction
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(np.asarray(samples), [tail, 1.0 - tail])
    return float(low), float(high), fraction


def _seed_table(
    frame: pl.DataFrame, mode: str, budget: str, seed: str, metric: str
) -> tuple[list[str], list[Hashable], dict[str, tuple[FloatArray, FloatArray]]]:
    """Modes, seeds (first appearance) and per mode (budgets, values[budget, seed] with NaN)."""
    rows = frame.select(
        pl.col(mode).cast(pl.String),
        pl.col(budget).cast(pl.Float64),
        pl.col(seed),
        pl.col(metric).cast(pl.Float64),
    ).rows()
    modes = _first_appearance([r[0] for r in rows])
    seeds = _first_appearance([r[2] for r in rows])
    seed_index = {s: i for i, s in enumerate(seeds)}
    sums: dict[tuple[str, float, int], list[float]] = {}
    for m, b, s, value in rows:
        if value is None or not math.isfinite(value) or b is None:
            continue
        sums.setdefault((m, b, seed_index[s]), []).append(value)
    table: dict[str, tuple[FloatArray, FloatArray]] = {}
    for m in modes:
        budgets = np.array(sorted({b for (mm, b, _) in sums if mm == m}), dtype=float)
        values = np.full((budgets.size, len(seeds)), np.nan)
        for j, b in enumerate(budgets):
            for s in range(len(seeds)):
                found = sums.get((m, float(b), s))
                if found:  # several rows of one seed (reruns) are averaged
                    values[j, s] = math.fsum(found) / len(found)
        table[m] = (budgets, values)
    return modes, seeds, table


def _weighted_means(values: FloatArray, weights: FloatArray) -> FloatArray:
    """Seed means per budget for each weight vector: (n_boot, n_budgets), NaN where empty."""
    present = np.isfinite(values).astype(float)
    filled = np.nan_to_num(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray((weights @ filled.T) / (weights @ present.T), dtype=float)


def analyse_frontier(
    frame: pl.DataFrame,
    reference: str = "rackwise",
    mode: str = "mode",
    budget: str = "budget",
    seed: str = "seed",
    metric: str = "test_loss",
    n_boot: int = 2000,
    rng_seed: int = 0,
    level: float = 0.95,
) -> FrontierAnalysis:
    """Fits, paired gaps, multipliers and crossovers of the tuned runs in `frame`.

    `frame` holds one row per mode, budget and seed (the tuned view); rows with a null or NaN
    metric are ignored. See the module docstring for the method; the paired gaps use a
    Student-t interval because a bootstrap percentile interval over 3–5 seeds only spans the
    observed values and is too narrow. Raises ValueError when `reference` has no rows.
    """
    missing = [c for c in (mode, budget, seed, metric) if c not in frame.columns]
    if missing:
        raise ValueError(f"columns not in the frame: {', '.join(missing)}")
    modes, seeds, table = _seed_table(frame, mode, budget, seed, metric)
    if reference not in table:
        raise ValueError(f"reference mode {reference!r} not among the modes {modes}")
    notes: list[str] = []

    # 1. fits on the seed means
    fits: dict[str, PowerLawFit | None] = {}
    mode_fits: list[ModeFit] = []
    for m in modes:
        budgets, values = table[m]
        with np.errstate(invalid="ignore"):
            means = np.nanmean(values, axis=1) if values.size else np.array([])
        fit, reason = fit_power_law_or_reason(budgets, means)
        fits[m] = fit
        mode_fits.append(ModeFit(mode=m, fit=fit, reason=reason, budgets=int(budgets.size)))

    # 2. paired gaps
    others = [m for m in modes if m != reference]
    ref_budgets, ref_values = table[reference]
    gaps: list[PairedGap] = []
    for m in others:
        budgets, values = table[m]
        for j, b in enumerate(budgets):
            matches = np.flatnonzero(ref_budgets == b)
            if matches.size == 0:
                continue
            diffs = values[j] - ref_values[matches[0]]
            diffs = diffs[np.isfinite(diffs)]
            if diffs.size == 0:
                notes.append(
                    f"{m} at {b:.2g} FLOPs: no seed measured for both {m} and {reference}; "
                    "no paired difference"
                )
                continue
            mean, low, high = t_interval(diffs.tolist(), level)
            gaps.append(PairedGap(m, reference, float(b), mean, low, high, int(diffs.size), level))

    # 3. multipliers and crossovers at the point estimate
    ref_fit = fits[reference]
    pairs = [m for m in others if fits[m] is not None and ref_fit is not None]
    windows: dict[str, tuple[float, float]] = {}
    for m in pairs:
        budgets = table[m][0]
        low_c = max(float(budgets.min()), float(ref_budgets.min()))
        high_c = min(float(budgets.max()), float(ref_budgets.max()))
        if low_c > high_c:  # no overlap: use the span of both
            low_c, high_c = high_c, low_c
        windows[m] = (low_c, high_c)

    def quantities(
        current: dict[str, PowerLawFit | None],
    ) -> dict[str, tuple[list[float | None], float | None]]:
        out: dict[str, tuple[list[float | None], float | None]] = {}
        ref = current.get(reference)
        for m in pairs:
            fit = current.get(m)
            if ref is None or fit is None:
                out[m] = ([None] * ref_budgets.size, None)
                continue
            low_c, high_c = windows[m]
            out[m] = (
                [_multiplier(fit, ref, float(b)) for b in ref_budgets],
                _crossover(fit, ref, low_c / 10.0, high_c * 10.0),
            )
        return out

    point = quantities(fits)

    # 4. bootstrap over seeds (one resampled seed list for all modes)
    boot_multipliers: dict[str, list[list[float]]] = {m: [[] for _ in ref_budgets] for m in pairs}
    boot_crossovers: dict[str, list[float]] = {m: [] for m in pairs}
    n_seeds = len(seeds)
    bootstrapped = bool(pairs) and n_seeds >= 2 and n_boot > 0
    if pairs and not bootstrapped:
        notes.append(
            f"{n_seeds} seed{'s' if n_seeds != 1 else ''}: no bootstrap, so the multipliers "
            "and crossovers have no interval"
        )
    if bootstrapped:
        distinct = math.comb(2 * n_seeds - 1, n_seeds)
        if n_seeds < 5:
            notes.append(
                f"bootstrap over {n_seeds} seeds has only {distinct} distinct resamples: the "
                "multiplier and crossover intervals are rough and likely too narrow"
            )
        rng = np.random.default_rng(rng_seed)
        draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
        # weights[r, s]: how many times seed s appears in resample r
        weights = np.zeros((n_boot, n_seeds))
        for column in range(n_seeds):
            weights[:, column] = (draws == column).sum(axis=1)
        involved = [reference, *pairs]
        boot_means = {m: _weighted_means(table[m][1], weights) for m in involved}
        for r in range(n_boot):
            current: dict[str, PowerLawFit | None] = {}
            for m in involved:
                current[m] = fit_power_law(table[m][0], boot_means[m][r])
            for m, (mults, cross) in quantities(current).items():
                for j, value in enumerate(mults):
                    if value is not None:
                        boot_multipliers[m][j].append(value)
                if cross is not None:
                    boot_crossovers[m].append(cross)

    multipliers: list[Multiplier] = []
    crossovers: list[Crossover] = []
    total = n_boot if bootstrapped else 0
    for m in pairs:
        mults, cross = point[m]
        for j, b in enumerate(ref_budgets):
            low, high, defined = _percentile(boot_multipliers[m][j], total, level)
            multipliers.append(
                Multiplier(m, reference, float(b), mults[j], low, high, defined, level)
            )
        low_c, high_c = windows[m]
        low, high, defined = _percentile(boot_crossovers[m], total, level)
        crossovers.append(
            Crossover(
                mode=m,
                reference=reference,
                budget=cross,
                inside=None if cross is None else bool(low_c <= cross <= high_c),
                low=low,
                high=high,
                defined=defined,
                level=level,
                measured_low=low_c,
                measured_high=high_c,
                search_low=low_c / 10.0,
                search_high=high_c * 10.0,
            )
        )
    return FrontierAnalysis(
        reference=reference,
        metric=metric,
        level=level,
        n_boot=n_boot if bootstrapped else 0,
        n_seeds=n_seeds,
        fits=tuple(mode_fits),
        gaps=tuple(gaps),
        multipliers=tuple(multipliers),
        crossovers=tuple(crossovers),
        notes=tuple(notes),
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
