"""Paired gaps, compute multipliers and crossovers of every mode against a reference, with
their intervals over seeds (see `stackwise.analysis.frontier`, steps 3–5)."""

from __future__ import annotations

import math
from collections.abc import Hashable

import numpy as np
import polars as pl

from stackwise.analysis.frontier.fit import (
    FloatArray,
    PowerLawFit,
    fit_power_law,
    fit_power_law_or_reason,
)
from stackwise.analysis.frontier.points import _first_appearance
from stackwise.analysis.frontier.results import (
    Crossover,
    FrontierAnalysis,
    ModeFit,
    Multiplier,
    PairedGap,
)
from stackwise.analysis.replicates import t_interval

_CROSSOVER_GRID = 400


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
    metric are ignored. See `stackwise.analysis.frontier` for the method; the paired gaps use
    a Student-t interval because a bootstrap percentile interval over 3–5 seeds only spans the
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
