"""Frontier figure: loss against compute per mode, with the seed spread and the fitted curves.

Method:

1. One line with markers per mode through the per-budget seed means (`frontier_points`
   columns ``mode``, ``budget``, ``mean``, ``std``, ``n``), compute on a log axis.
2. A shaded band of ±1 standard deviation over seeds (or ±1 standard error with
   ``band="sem"``, none with ``band="none"``); the legend says which.
3. The fitted power law of each mode, when there is one, dashed in the mode's colour over the
   plotted compute range.
4. The figure is a `matplotlib.figure.Figure` on the Agg canvas (no pyplot, no global state);
   `save_figure` writes it (PNG by the file's suffix).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from stackwise.analysis.frontier import PowerLawFit

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MODE_COLOURS", "SPARE_COLOURS", "frontier_figure", "save_figure"]

MODE_COLOURS = {
    "rackwise": "#1f77b4",
    "stackwise": "#ff7f0e",
    "blockwise": "#2ca02c",
    "layerwise": "#2ca02c",
    "progressive": "#9467bd",
}
SPARE_COLOURS = ("#d62728", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_BANDS = {"std": "±1 std over seeds", "sem": "±1 s.e.m. over seeds", "none": ""}


def frontier_figure(
    points: pl.DataFrame,
    fits: dict[str, PowerLawFit | None],
    band: str = "std",
    x: str = "budget",
    ylabel: str = "test loss (nats)",
) -> Figure:
    """Loss against compute (`x`: ``budget`` or ``flops``) per mode; see the module docstring."""
    if band not in _BANDS:
        raise ValueError(f"band must be one of {', '.join(_BANDS)}; got {band!r}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    modes = list(dict.fromkeys(points.get_column("mode").to_list()))
    spare = iter(SPARE_COLOURS * (len(modes) // len(SPARE_COLOURS) + 1))
    colours = {m: MODE_COLOURS.get(m) or next(spare) for m in modes}
    xs_all: list[float] = []
    for mode in modes:
        rows = points.filter(pl.col("mode") == mode).sort(x)
        xs = np.asarray(rows.get_column(x).cast(pl.Float64).to_list(), dtype=float)
        mean = np.asarray(rows.get_column("mean").fill_null(np.nan).to_list(), dtype=float)
        std = np.asarray(rows.get_column("std").fill_null(np.nan).to_list(), dtype=float)
        keep = np.isfinite(xs) & np.isfinite(mean) & (xs > 0)
        xs, mean, std = xs[keep], mean[keep], std[keep]
        if band == "sem":
            n = np.asarray(rows.get_column("n").to_list(), dtype=float)[keep]
            std = std / np.sqrt(np.maximum(n, 1.0))
        colour = colours[mode]
        axis.plot(xs, mean, marker="o", color=colour, label=mode)
        if band != "none":
            spread = np.nan_to_num(std)
            axis.fill_between(xs, mean - spread, mean + spread, color=colour, alpha=0.2, lw=0)
        xs_all.extend(xs.tolist())
    if xs_all:
        grid = np.geomspace(min(xs_all), max(xs_all), 200)
        for mode in modes:
            fit = fits.get(mode)
            if fit is not None:
                axis.plot(grid, fit.predict(grid), linestyle="--", color=colours[mode], lw=1.2)
    axis.set_xscale("log")
    axis.set_xlabel("compute (FLOPs)" if x == "budget" else f"{x} (FLOPs)")
    axis.set_ylabel(ylabel)
    axis.grid(True, which="both", alpha=0.3)
    handles, _ = axis.get_legend_handles_labels()
    extra: list[Line2D | Patch] = []
    if any(fits.get(m) is not None for m in modes):
        extra.append(Line2D([], [], color="grey", linestyle="--", label="fit: E + A·C^(−α)"))
    if band != "none":
        extra.append(Patch(color="grey", alpha=0.2, label=f"band: {_BANDS[band]}"))
    axis.legend(handles=[*handles, *extra], fontsize="small")
    axis.set_title("loss against compute")
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write `figure` to `path` (parent folders created); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=dpi)
    return target
