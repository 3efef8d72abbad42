"""Analysis of finished runs: from a polars frame of runs to tables, intervals and a report.

Pure Python on polars, numpy, scipy and matplotlib: no torch, no MLflow. The steps:

1. `replicates`: seeds of one configuration → mean, std, s.e.m., min, max, n; t-intervals.
2. `tuning`: per grid point, the tuned setting with the best seed-mean validation loss, and
   warnings when the best value lies at the edge of the sweep.
3. `frontier`: per mode a power-law fit L(C) = E + A·C^(−α), paired gaps against a reference
   mode with Student-t intervals, compute multipliers and crossovers with seed-bootstrap
   intervals.
4. `conclusions`: fixed rules turning each estimate and interval into one sentence.
5. `report`: one markdown document; `plots`: the loss-against-compute figure.
"""

from __future__ import annotations

from stackwise.analysis.conclusions import describe_epochs, describe_gap, describe_multiplier
from stackwise.analysis.frontier import (
    Crossover,
    FrontierAnalysis,
    ModeFit,
    Multiplier,
    PairedGap,
    PowerLawFit,
    analyse_frontier,
    epoch_warnings,
    fit_power_law,
    fit_power_law_or_reason,
    frontier_points,
)
from stackwise.analysis.plots import frontier_figure, save_figure
from stackwise.analysis.replicates import aggregate_replicates, format_mean_std, t_interval
from stackwise.analysis.report import QUESTION, ReportDesign, render_report
from stackwise.analysis.tuning import TunedSelection, select_tuned

__all__ = [
    "QUESTION",
    "Crossover",
    "FrontierAnalysis",
    "ModeFit",
    "Multiplier",
    "PairedGap",
    "PowerLawFit",
    "ReportDesign",
    "TunedSelection",
    "aggregate_replicates",
    "analyse_frontier",
    "describe_epochs",
    "describe_gap",
    "describe_multiplier",
    "epoch_warnings",
    "fit_power_law",
    "fit_power_law_or_reason",
    "format_mean_std",
    "frontier_figure",
    "frontier_points",
    "render_report",
    "save_figure",
    "select_tuned",
    "t_interval",
]
