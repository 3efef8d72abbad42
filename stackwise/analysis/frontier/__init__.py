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

The modules: `fit` (step 1), `points` (step 2, and `epoch_warnings`), `intervals` (steps 3–5,
`analyse_frontier`) and `results` (what `analyse_frontier` returns, and its tables).
"""

from stackwise.analysis.frontier.fit import ALPHA_MAX as ALPHA_MAX
from stackwise.analysis.frontier.fit import ALPHA_MIN as ALPHA_MIN
from stackwise.analysis.frontier.fit import FloatArray as FloatArray
from stackwise.analysis.frontier.fit import PowerLawFit, fit_power_law, fit_power_law_or_reason
from stackwise.analysis.frontier.intervals import analyse_frontier
from stackwise.analysis.frontier.points import epoch_warnings, frontier_points
from stackwise.analysis.frontier.results import (
    Crossover,
    FrontierAnalysis,
    ModeFit,
    Multiplier,
    PairedGap,
)

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
