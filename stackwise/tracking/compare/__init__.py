"""Comparing tracked runs: polars rows per run, tables, pivots and plots that never hide a run.

`compare_runs` reads the grid-point runs of one or more experiments from MLflow and returns a
DataFrame with the grid coordinates as columns and the headline results — final validation loss,
perplexity, executed FLOPs, tokens seen and distinct tokens, tokens/s, peak memory, wall time,
parameters — plus status, start time and config hash. Which runs it shows:

1. An experiment *file* is resolved as `stackwise run` would resolve it now (``--set`` and
   ``--only`` included), giving each grid point's run identity (the ``config_hash`` tag: its
   settings, its data's content, its device type). Per grid point the frame holds the latest
   FINISHED run with that identity, else its latest attempt (a failed or running one).
2. An experiment *name* has no current settings: per grid point (run name) its latest
   FINISHED run, else its latest attempt.
3. Runs not shown (older settings, earlier attempts) and grid points without a run are never
   dropped silently: a note says how many and how to see them. ``all_runs`` shows every run,
   with a ``current`` column (yes: the run view 1./2. shows) and one column per param that differs
   between runs of one grid point.
4. A pivot cell holding several runs is an error naming what differs inside it, unless an
   aggregation (mean, min, max, last) is asked for.
5. Plots (PNG files on each parent run, or ``--plot DIR``) draw one mark per run: validation loss
   against executed FLOPs, tokens and wall-clock seconds (one panel per mode, lines coloured by
   the coordinate that varies most within it, stage boundaries marked), and final validation
   loss against training memory (labelled points).

The package's parts: `common` (columns, metric names, formats, `CompareError`), `experiments`
(files and names -> experiments, current run identities), `selection` (which runs of a grid
point are shown), `frame` (the runs as a polars frame: `runs_frame`, `compare_runs`), `shape`
(`--columns`, pivots and aggregation over seeds), `formatting` (tables, Markdown, `render`),
`curves` (what a plot draws of each run) and `plots` (the figures and their PNG files).
"""

from __future__ import annotations

from stackwise.tracking.compare.common import (
    AGGREGATIONS,
    DEFAULT_METRIC,
    FORMATS,
    HEAD_PARAM,
    INTEGER_COLUMNS,
    METRIC_ALIASES,
    RESULT_COLUMNS,
    TUNED_AXES,
    CompareError,
    resolve_metric,
)
from stackwise.tracking.compare.curves import (
    X_AXES,
    MetricHistory,
    RunCurve,
    client_history,
    client_timestamps,
    load_curves,
)
from stackwise.tracking.compare.experiments import (
    ExperimentRef,
    current_identity,
    resolve_experiments,
)
from stackwise.tracking.compare.formatting import (
    HIDDEN_IN_TABLES,
    SHOWN_WITH_ALL,
    STATUS_STYLES,
    display_frame,
    print_frame,
    render,
    table_cells,
    to_markdown,
)
from stackwise.tracking.compare.frame import compare_runs, runs_frame
from stackwise.tracking.compare.plots import (
    LEGEND_ROWS,
    LINE_STYLES,
    NAMED_POINTS,
    PANEL_COLOURS,
    PLOT_FILES,
    POINT_MARKERS,
    STAGE_MARKER,
    loss_figure,
    memory_figure,
    save_plots,
)
from stackwise.tracking.compare.selection import select_runs
from stackwise.tracking.compare.shape import (
    HEADLINE_RESULTS,
    headline_frame,
    parse_pivot,
    pivot_frame,
    select_columns,
)

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_METRIC",
    "FORMATS",
    "HEADLINE_RESULTS",
    "HEAD_PARAM",
    "HIDDEN_IN_TABLES",
    "INTEGER_COLUMNS",
    "LEGEND_ROWS",
    "LINE_STYLES",
    "METRIC_ALIASES",
    "NAMED_POINTS",
    "PANEL_COLOURS",
    "PLOT_FILES",
    "POINT_MARKERS",
    "RESULT_COLUMNS",
    "SHOWN_WITH_ALL",
    "STAGE_MARKER",
    "STATUS_STYLES",
    "TUNED_AXES",
    "X_AXES",
    "CompareError",
    "ExperimentRef",
    "MetricHistory",
    "RunCurve",
    "client_history",
    "client_timestamps",
    "compare_runs",
    "current_identity",
    "display_frame",
    "headline_frame",
    "load_curves",
    "loss_figure",
    "memory_figure",
    "parse_pivot",
    "pivot_frame",
    "print_frame",
    "render",
    "resolve_experiments",
    "resolve_metric",
    "runs_frame",
    "save_plots",
    "select_columns",
    "select_runs",
    "table_cells",
    "to_markdown",
]
