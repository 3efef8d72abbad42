"""The power law L(C) = E + A·C^(−α) of one mode's loss against compute, fitted by least
squares (see `stackwise.analysis.frontier`, step 1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

ALPHA_MIN = 1e-3
ALPHA_MAX = 4.0
_ALPHA_GRID = np.geomspace(ALPHA_MIN, ALPHA_MAX, 80)
_MAX_STARTS = 3


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
    """Least-squares fit of L(C) = E + A·C^(−α) (see `stackwise.analysis.frontier`, step 1).

    Pairs with a non-finite value or C ≤ 0 are dropped. Returns None, never raises, with fewer
    than 3 distinct budgets or when the losses do not decrease with compute.
    """
    return fit_power_law_or_reason(compute, loss)[0]
