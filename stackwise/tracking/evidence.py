"""From runs to evidence: the per-point view of replicated, tuned runs; frontiers; the report.

A comparison frame (`stackwise.tracking.compare.runs_frame`) has one row per run. When an
experiment lists ``seeds`` or ``tune``, its runs are replicates and sweeps of grid points, and
what a reader wants is one row per grid point:

1. **Tuning.** Per grid point (the ``point`` column: its grid coordinates), the tuned values
   (``tune:`` of the file, one column each) with the lowest validation loss averaged over seeds
   are chosen (`stackwise.analysis.select_tuned`); a choice at the edge of the values tried is
   a warning ("extend the sweep"). Selection uses validation loss only; the test loss of the
   chosen runs is what the comparison reports.
2. **Replicates.** The chosen runs of a point are aggregated over seeds: mean, standard
   deviation, standard error and count (``val_loss_mean``, ``val_loss_std``, ``n`` …); a table
   shows ``1.2340 ± 0.0120 (3)``.
3. **Frontier.** With a ``budget`` axis (``training.budget.flops``), the tuned, seed-averaged test
   loss per mode and budget is fitted by L(C) = E + A·C^(−α) per mode, and each mode is compared
   with rackwise on the same seeds (`stackwise.analysis.analyse_frontier`).
4. **Report.** `build_report` turns 1.–3. into one markdown document with its plot.

``--all`` shows every run instead, untouched.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl

from stackwise.analysis import (
    FrontierAnalysis,
    ReportDesign,
    TunedSelection,
    aggregate_replicates,
    analyse_frontier,
    format_mean_std,
    frontier_figure,
    frontier_points,
    render_report,
    save_figure,
    select_tuned,
)

# Result columns a per-point row keeps as mean, std and sem (the others: the mean only).
SPREAD_COLUMNS = ("val_loss", "test_loss")
# Hidden bookkeeping column of a runs frame: the tuned settings' column names, comma-separated.
TUNED_AXES = "tuned_axes"
# Columns of a runs frame that belong to one run, never to its grid point.
_PER_RUN = ("run", "seed", "status", "start_time", "config_hash", "run_id", "parent_run_id")


class EvidenceError(ValueError):
    """A comparison that cannot be made from the runs at hand (said why)."""


def tuned_columns(frame: pl.DataFrame) -> list[str]:
    """The columns of the tuned settings (``tune:`` of the experiment file), in file order."""
    if TUNED_AXES not in frame.columns:
        return []
    names: list[str] = []
    for value in frame[TUNED_AXES].drop_nulls().to_list():
        names.extend(n for n in str(value).split(",") if n and n not in names)
    return [n for n in names if n in frame.columns]


def is_replicated(frame: pl.DataFrame) -> bool:
    """Whether the runs are seeds and tuned values of grid points (the file lists ``seeds`` or
    ``tune``)."""
    return "point" in frame.columns


@dataclass
class PointView:
    """The tuned, seed-aggregated view: one row per grid point."""

    frame: pl.DataFrame  # numeric: `<m>_mean`, `<m>_std`, `<m>_sem` of SPREAD_COLUMNS, n, ...
    selection: TunedSelection | None
    notes: list[str] = field(default_factory=list)


def _numeric(frame: pl.DataFrame, columns: Sequence[str]) -> pl.DataFrame:
    """Budgets and tuned values as numbers where every value reads as one (labels are text)."""
    changes = []
    for column in columns:
        if column in frame.columns and frame.schema[column] == pl.String:
            converted = frame[column].cast(pl.Float64, strict=False)
            if converted.null_count() == frame[column].null_count():
                changes.append(converted.alias(column))
    return frame.with_columns(changes) if changes else frame


def tuned_runs(
    frame: pl.DataFrame, metric: str = "val_loss", numeric_budget: bool = False
) -> tuple[pl.DataFrame, Any]:
    """The runs of each grid point's chosen tuned values (all runs when nothing is tuned) and
    the selection (None when nothing is tuned). Budgets stay the labels of the file (`1.0e11`)
    unless `numeric_budget`."""
    tuned = tuned_columns(frame)
    if not tuned:
        return frame, None
    if "seed" not in frame.columns:
        frame = frame.with_columns(pl.lit(0, dtype=pl.Int64).alias("seed"))
    numeric = _numeric(frame, [*tuned, "budget"] if numeric_budget else tuned)
    selection = select_tuned(numeric, ["point"], tuned, seed="seed", metric=metric)
    return selection.runs, selection


def point_view(frame: pl.DataFrame, metric: str = "val_loss") -> PointView:
    """One row per grid point: tuned values chosen on `metric` (validation loss), results
    averaged over seeds (module docstring 1.-2.)."""
    from stackwise.tracking.compare import RESULT_COLUMNS

    runs, selection = tuned_runs(frame, metric)
    notes: list[str] = []
    if selection is not None:
        notes.extend(selection.warnings)
    results = [c for c in RESULT_COLUMNS if c in runs.columns]
    group = [
        c
        for c in runs.columns
        if c not in _PER_RUN and c not in results and c != TUNED_AXES and c != "current"
    ]
    # A descriptive column that varies inside a point (e.g. a param changed between reruns)
    # would split it: keep only the columns constant within every point.
    constant = [
        c
        for c in group
        if c == "point"
        or runs.group_by("point").agg(pl.col(c).n_unique().alias("k"))["k"].max() in (None, 1)
    ]
    aggregated = aggregate_replicates(runs, constant, results)
    columns: list[pl.Expr] = [pl.col(c) for c in constant]
    columns.append(pl.col("n"))
    for result in results:
        name = f"{result}_mean" if result in SPREAD_COLUMNS else result
        columns.append(pl.col(f"{result}_mean").alias(name))
        if result in SPREAD_COLUMNS:
            columns += [pl.col(f"{result}_std"), pl.col(f"{result}_sem")]
    view = aggregated.select(columns)
    # The run column names the point; tuned values stay as their own columns.
    view = view.rename({"point": "run"}).select(
        "run", *[c for c in view.columns if c not in ("run", "point")]
    )
    return PointView(view, selection, notes)


def display_points(frame: pl.DataFrame) -> pl.DataFrame:
    """A point view for people: ``val_loss`` and ``test_loss`` as ``mean ± std (n)``."""
    changes = []
    drop: list[str] = []
    for result in SPREAD_COLUMNS:
        mean, std = f"{result}_mean", f"{result}_std"
        if mean not in frame.columns:
            continue
        texts = [
            "-" if m is None or math.isnan(m) else format_mean_std(m, sd, n)
            for m, sd, n in zip(frame[mean], frame[std], frame["n"], strict=True)
        ]
        changes.append(pl.Series(result, texts, dtype=pl.String))
        drop += [mean, std, f"{result}_sem"]
    shown = frame.with_columns(changes) if changes else frame
    order = []
    for column in frame.columns:
        if column in drop:
            name = column.rsplit("_", 1)[0]
            if column.endswith("_mean") and name not in order:
                order.append(name)
        elif column not in order:
            order.append(column)
    return shown.select(order)


# --------------------------------------------------------------------------------------------
# frontier and report
# --------------------------------------------------------------------------------------------


def frontier_runs(frame: pl.DataFrame) -> pl.DataFrame:
    """The tuned runs with a numeric ``budget`` and a ``mode``; refuses (says why) otherwise."""
    if "budget" not in frame.columns:
        raise EvidenceError(
            "--frontier needs runs at several compute budgets: a grid axis "
            "`training.budget.flops` (short name budget), e.g. budget: [1e11, 1e12, 1e13]"
        )
    if "mode" not in frame.columns:
        raise EvidenceError("--frontier compares training modes: the grid needs a `mode` axis")
    runs, _ = tuned_runs(frame, numeric_budget=True)
    runs = _numeric(runs, ["budget"])
    if runs.schema["budget"] != pl.Float64:
        raise EvidenceError("--frontier: the budget axis must hold numbers of FLOPs")
    if "seed" not in runs.columns:
        runs = runs.with_columns(pl.lit(0, dtype=pl.Int64).alias("seed"))
    finished = runs.filter(pl.col("status") == "FINISHED") if "status" in runs.columns else runs
    return finished.filter(pl.col("test_loss").is_not_null() & pl.col("test_loss").is_not_nan())


def reference_mode(runs: pl.DataFrame) -> str:
    modes = runs["mode"].unique(maintain_order=True).to_list()
    if "rackwise" in modes:
        return "rackwise"
    raise EvidenceError(
        f"--frontier compares each mode with end-to-end training: no finished rackwise run "
        f"(modes: {', '.join(map(str, modes)) or 'none'})"
    )


def frontier_analysis(frame: pl.DataFrame, n_boot: int = 2000) -> FrontierAnalysis:
    """Fits, paired gaps, multipliers and crossovers of the tuned runs (module docstring 3.)."""
    runs = frontier_runs(frame)
    return analyse_frontier(runs, reference=reference_mode(runs), metric="test_loss", n_boot=n_boot)


def frontier_plot(analysis: FrontierAnalysis, frame: pl.DataFrame, path: Path) -> Path:
    runs = frontier_runs(frame)
    points = frontier_points(runs, metric="test_loss")
    fits = {item.mode: item.fit for item in analysis.fits}
    return save_figure(frontier_figure(points, fits), path)


def _describe_model(spec_config: Any) -> str:
    model = spec_config.model
    stacks = model.resolved_stacks()
    return (
        f"d_model {model.d_model}, {len(stacks)} stacks, {model.n_blocks} blocks, "
        f"{model.attention_type} {model.attention_mode} attention; objective "
        f"{spec_config.training.objective}, {spec_config.training.batch_size} x "
        f"{spec_config.training.seq_len} tokens per step"
    )


def machine_description() -> str:
    import os

    import torch

    processor = platform.processor() or platform.machine()
    return (
        f"{os.cpu_count()} CPU cores ({processor}), {platform.system()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def build_report(
    frame: pl.DataFrame,
    file: Path,
    plot_path: Path | None,
    n_boot: int = 2000,
    commit: str | None = None,
    command: str = "",
) -> tuple[str, Path | None]:
    """The markdown report of an experiment file's runs and the plot written beside it."""
    from stackwise.config.experiment import expand_grid, load_experiment

    experiment = load_experiment(file)
    specs = expand_grid(experiment)
    first = specs[0].config
    analysis: FrontierAnalysis | None = None
    runs, selection = tuned_runs(frame, numeric_budget=True)
    if selection is None:
        raise EvidenceError(
            f"{file}: a report compares tuned, replicated runs; the file needs `tune:` (and "
            "`seeds:`)"
        )
    written: Path | None = None
    try:
        analysis = frontier_analysis(frame, n_boot=n_boot)
    except EvidenceError:
        analysis = None
    if analysis is not None and plot_path is not None:
        written = frontier_plot(analysis, frame, plot_path)
    config = experiment.config
    tokens = None
    if "tokens_seen" in runs.columns and "epochs" in runs.columns and runs.height:
        row = runs.filter(pl.col("epochs") > 0).row(0, named=True)
        tokens = round(row["tokens_seen"] / row["epochs"])
    budgets = sorted({float(s.labels["budget"]) for s in specs if "budget" in s.labels})
    design = ReportDesign(
        experiment=config.name,
        description=config.description,
        model=_describe_model(first),
        modes=list(dict.fromkeys(s.coordinates.get("mode", "") for s in specs)),
        budgets=budgets,
        seeds=list(config.seeds or []),
        tuned={k: list(v) for k, v in (config.tune or {}).items()},
        data_source=f"{first.data.source} ({first.data.tokenizer} tokens)",
        train_tokens=tokens,
        machine=machine_description(),
        date=date.today().isoformat(),
        commit=commit or "",
        command=command,
    )
    relative = None
    if written is not None:
        relative = written.name
    text = render_report(design, frame, selection, analysis, relative)
    return text, written


# --------------------------------------------------------------------------------------------
# what `stackwise compare` shows
# --------------------------------------------------------------------------------------------

HUMAN_FORMATS = ("table", "markdown")


def comparison_table(
    frame: pl.DataFrame,
    fmt: str,
    pivot: str | None = None,
    metric: str | None = None,
    agg: str | None = None,
    all_runs: bool = False,
) -> tuple[pl.DataFrame, list[str]]:
    """What `stackwise compare` prints for `frame` and the notes that go with it.

    Replicated or tuned runs (and not `all_runs`) become the point view: each point at its
    chosen tuned values, aggregated over seeds (``mean ± std (n)`` in tables; ``*_mean``,
    ``*_std``, ``n`` columns in csv/json/parquet). ``--pivot`` cells show the same; with
    ``--agg`` the cell combines the chosen runs of its points instead (mean, std, sem, count …).
    """
    from stackwise.tracking.compare import pivot_frame, resolve_metric

    if all_runs or not is_replicated(frame):
        table = frame if pivot is None else pivot_frame(frame, pivot, metric, agg)
        return table, []
    view = point_view(frame)
    notes = list(view.notes)
    if view.selection is not None and view.selection.choices.height:
        tuned = ", ".join(view.selection.tuned)
        notes.append(
            f"each grid point at its best {tuned} (lowest validation loss averaged over seeds; "
            "--all shows the whole sweep)"
        )
    if pivot is not None:
        if agg is not None:
            runs, _ = tuned_runs(frame)
            return pivot_frame(runs, pivot, metric, agg), notes
        value = resolve_metric(metric)
        shown = view.frame
        if value in SPREAD_COLUMNS:
            shown = (
                display_points(shown)
                if fmt in HUMAN_FORMATS
                else shown.with_columns(pl.col(f"{value}_mean").alias(value))
            )
        points = shown.rename({"run": "point"}) if "point" not in shown.columns else shown
        return pivot_frame(points, pivot, metric, None), notes
    table = display_points(view.frame) if fmt in HUMAN_FORMATS else view.frame
    return table, notes


def frontier_tables(analysis: FrontierAnalysis, frame: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The frontier as tables: per mode and budget the tuned, seed-averaged test loss (with
    executed FLOPs and epochs), then fits, paired gaps, multipliers and crossovers."""
    runs = frontier_runs(frame)
    group = ["mode", "budget"]
    metrics: list[str] = [
        c for c in ("test_loss", "val_loss", "flops", "epochs") if c in runs.columns
    ]
    points = aggregate_replicates(runs, group, metrics)
    order = {m: i for i, m in enumerate(runs["mode"].unique(maintain_order=True).to_list())}
    points = points.sort(pl.col("mode").replace_strict(order, default=len(order)), pl.col("budget"))
    columns = [pl.col("mode"), pl.col("budget"), pl.col("n")]
    for metric in metrics:
        if metric in SPREAD_COLUMNS:
            columns += [pl.col(f"{metric}_mean"), pl.col(f"{metric}_std")]
        else:
            columns.append(pl.col(f"{metric}_mean").alias(metric))
    tables = {"points": points.select(columns)}
    tables.update(analysis.to_frames())
    return tables


def latest_parent(frame: pl.DataFrame) -> str | None:
    """The parent (grid) run of the latest started run in `frame`."""
    if "parent_run_id" not in frame.columns or frame.height == 0:
        return None
    rows = frame.filter(pl.col("parent_run_id").is_not_null())
    if rows.height == 0:
        return None
    if "start_time" in rows.columns:
        rows = rows.sort("start_time", nulls_last=False)
    return str(rows["parent_run_id"][-1])


def runs_commit(clients: dict[str, Any], frame: pl.DataFrame) -> str | None:
    """The code commit the runs recorded (the commits, comma-separated, when they differ)."""
    from stackwise.tracking.logger import TAG_GIT_COMMIT

    commits: list[str] = []
    for run_id in frame["run_id"].to_list() if "run_id" in frame.columns else []:
        client = clients.get(run_id)
        if client is None:
            continue
        commit = client.get_run(run_id).data.tags.get(TAG_GIT_COMMIT)
        if commit and commit[:10] not in commits:
            commits.append(commit[:10])
    return ", ".join(commits) or None


def log_report(
    clients: dict[str, Any], frame: pl.DataFrame, text: str, plot: Path | None
) -> str | None:
    """Log the report (and its plot) on the latest parent run; returns that run's id."""
    parent = latest_parent(frame)
    if parent is None or not frame.height:
        return None
    client = clients.get(str(frame["run_id"][0]))
    if client is None:
        return None
    client.log_text(parent, text, "report.md")
    if plot is not None:
        client.log_artifact(parent, str(plot))
    return parent
