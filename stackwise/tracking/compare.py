"""Comparing tracked runs: one polars row per grid point, tables, pivots and plots.

`compare_runs` reads the grid-point runs of one or more experiments from MLflow and returns a
DataFrame with the grid coordinates as columns and the headline results — final validation loss,
perplexity, tokens/s, peak memory, wall time, parameters, FLOPs — plus status. A grid point that
was run several times (``--force``, or failed then finished) appears once: its latest FINISHED
run if it has one, else its latest attempt.

The same frame feeds `stackwise compare` (rich table, CSV, Markdown, JSON, Parquet, pivots) and
the artifacts the runner saves on each parent run (``comparison.csv``/``.md`` and PNG plots).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from stackwise.tracking.logger import (
    TAG_CONFIG_HASH,
    TAG_GRID_PREFIX,
    TAG_PARENT,
    TAG_ROLE,
    TAG_RUN_NAME,
)
from stackwise.tracking.store import resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from rich.console import Console

FORMATS = ("table", "csv", "markdown", "json", "parquet")

# Result columns: name in the frame -> MLflow metric (summary metrics of a finished run).
RESULT_COLUMNS: dict[str, str] = {
    "val_loss": "final_val_loss",
    "perplexity": "final_val_perplexity",
    "tokens_per_s": "tokens_per_s",
    "peak_memory_mb": "peak_memory_bytes",
    "wall_time_s": "wall_time_s",
    "parameters": "parameters",
    "flops": "flops",
}
# Friendly names accepted by `--metric`.
METRIC_ALIASES: dict[str, str] = {
    "loss": "val_loss",
    "final_val_loss": "val_loss",
    "val/loss": "val_loss",
    "final_val_perplexity": "perplexity",
    "val/perplexity": "perplexity",
    "ppl": "perplexity",
    "peak_memory": "peak_memory_mb",
    "memory": "peak_memory_mb",
    "peak_memory_bytes": "peak_memory_mb",
    "wall_time": "wall_time_s",
    "time": "wall_time_s",
    "params": "parameters",
}
DEFAULT_METRIC = "val_loss"


class CompareError(ValueError):
    """A user mistake in a compare request (unknown experiment, column, format …)."""


@dataclass(frozen=True)
class ExperimentRef:
    """An experiment to compare: its MLflow name and the store it lives in."""

    name: str
    tracking_uri: str


def resolve_experiments(
    items: Sequence[str], tracking_uri: str | None = None
) -> list[ExperimentRef]:
    """Experiment files or names -> MLflow experiment names and stores.

    An item that is an existing file (or ends in .yaml/.yml) is loaded as an experiment file:
    its ``name`` (or ``tracking.experiment_name``) and its ``tracking.uri`` are used, exactly
    as `stackwise run` would. Anything else is an MLflow experiment name.
    """
    refs: list[ExperimentRef] = []
    for item in items:
        if Path(item).is_file() or item.endswith((".yaml", ".yml")):
            from stackwise.config.experiment import expand_grid, load_experiment

            experiment = load_experiment(item)
            specs = expand_grid(experiment)
            seen: set[tuple[str, str]] = set()
            for spec in specs:
                name = spec.config.tracking.experiment_name or spec.experiment_name
                uri = resolve_tracking_uri(tracking_uri, spec.config.tracking.uri)
                if (name, uri) not in seen:
                    seen.add((name, uri))
                    refs.append(ExperimentRef(name, uri))
        else:
            refs.append(ExperimentRef(item, resolve_tracking_uri(tracking_uri)))
    return refs


def resolve_metric(metric: str | None) -> str:
    """A `--metric` value -> frame column name (aliases allowed; other names are MLflow keys)."""
    if metric is None:
        return DEFAULT_METRIC
    return METRIC_ALIASES.get(metric, metric)


def _search_point_runs(
    client: MlflowClient, experiment_ids: list[str], run_ids: Iterable[str] | None = None
) -> list[Run]:
    """All grid-point runs of the experiments (every page)."""
    from mlflow.entities import ViewType

    filter_string = f"tags.`{TAG_ROLE}` = 'point'"
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    if run_ids is not None:
        wanted = set(run_ids)
        runs = [r for r in runs if r.info.run_id in wanted]
    return runs


def _pick_latest(runs: list[Run]) -> list[Run]:
    """One run per (experiment, config hash): the latest FINISHED, else the latest attempt."""
    chosen: dict[tuple[str, str], Run] = {}
    order: list[tuple[str, str]] = []
    for run in runs:  # ascending start time
        key = (run.info.experiment_id, run.data.tags.get(TAG_CONFIG_HASH, run.info.run_id))
        if key not in chosen:
            order.append(key)
            chosen[key] = run
            continue
        previous = chosen[key]
        if run.info.status == "FINISHED" or previous.info.status != "FINISHED":
            chosen[key] = run
    return [chosen[k] for k in order]


def runs_frame(
    client: MlflowClient,
    experiment_ids: dict[str, str],
    run_ids: Iterable[str] | None = None,
    metric: str | None = None,
    latest_only: bool = True,
) -> pl.DataFrame:
    """The comparison frame for experiments ``{id: name}`` (optionally only some run ids)."""
    runs = _search_point_runs(client, list(experiment_ids), run_ids)
    if latest_only:
        runs = _pick_latest(runs)
    metric_column = resolve_metric(metric)
    extra_metric = None if metric_column in RESULT_COLUMNS else metric_column

    axes: list[str] = []
    for run in runs:
        for key in run.data.tags:
            if key.startswith(TAG_GRID_PREFIX) and key[len(TAG_GRID_PREFIX) :] not in axes:
                axes.append(key[len(TAG_GRID_PREFIX) :])
    fixed = [c for c in ("training_architecture", "objective", "size") if c not in axes]

    rows: list[dict[str, Any]] = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        row: dict[str, Any] = {
            "experiment": experiment_ids.get(run.info.experiment_id, run.info.experiment_id),
            "run": tags.get(TAG_RUN_NAME, run.info.run_name),
        }
        for axis in axes:
            row[axis] = tags.get(f"{TAG_GRID_PREFIX}{axis}")
        for column in fixed:
            row[column] = tags.get(column)
        row["status"] = run.info.status
        for column, key in RESULT_COLUMNS.items():
            value = metrics.get(key)
            if value is not None and column == "peak_memory_mb":
                value = value / 2**20
            row[column] = value
        if extra_metric is not None:
            row[extra_metric] = metrics.get(extra_metric)
        row["run_id"] = run.info.run_id
        row["parent_run_id"] = tags.get(TAG_PARENT)
        row["config_hash"] = tags.get(TAG_CONFIG_HASH)
        rows.append(row)

    schema: dict[str, Any] = {"experiment": pl.String, "run": pl.String}
    schema.update({axis: pl.String for axis in axes})
    schema.update({column: pl.String for column in fixed})
    schema["status"] = pl.String
    schema.update({column: pl.Float64 for column in RESULT_COLUMNS})
    if extra_metric is not None:
        schema[extra_metric] = pl.Float64
    schema.update({"run_id": pl.String, "parent_run_id": pl.String, "config_hash": pl.String})
    frame = pl.DataFrame(rows, schema=schema, orient="row")
    return frame.with_columns(pl.col("parameters").cast(pl.Int64, strict=False))


def compare_runs(
    experiments: Sequence[str],
    tracking_uri: str | None = None,
    metric: str | None = None,
    notes: list[str] | None = None,
) -> pl.DataFrame:
    """One row per grid point of the given experiments (files or MLflow experiment names).

    Columns: ``experiment``, ``run``, one column per grid axis, ``training_architecture``,
    ``objective``, ``size`` (unless an axis already has that name), ``status``, ``val_loss``,
    ``perplexity``, ``tokens_per_s``, ``peak_memory_mb``, ``wall_time_s``, ``parameters``,
    ``flops``, the `metric` when it is another MLflow metric, ``run_id``, ``parent_run_id``
    and ``config_hash``. Raises `CompareError` for an experiment the store does not have; when
    `notes` is given and several experiments are named, one that has not been run yet is left
    out with a line in `notes` instead (``stackwise compare experiments/*.yaml`` after running
    some of them), as long as at least one is found.
    """
    from mlflow import MlflowClient

    refs = resolve_experiments(experiments, tracking_uri)
    if not refs:
        raise CompareError("name at least one experiment file or MLflow experiment")
    lenient = notes is not None and len(refs) > 1
    frames = []
    missing: list[CompareError] = []
    by_store: dict[str, list[str]] = {}
    for ref in refs:
        by_store.setdefault(ref.tracking_uri, []).append(ref.name)
    for uri, names in by_store.items():
        _check_store(uri)
        # Opening a client on a SQLite URI creates the database: only after the checks above.
        client = MlflowClient(tracking_uri=uri)
        ids: dict[str, str] = {}
        for name in names:
            try:
                experiment = _get_experiment(client, uri, name)
            except CompareError as error:
                if not lenient:
                    raise
                missing.append(error)
                continue
            ids[str(experiment.experiment_id)] = name
        if ids:
            frames.append(runs_frame(client, ids, metric=metric))
    if not frames:
        raise missing[0]
    if notes is not None:
        notes.extend(f"left out: {error}" for error in missing)
    frame = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
    column = resolve_metric(metric)
    if column not in RESULT_COLUMNS and frame.height and frame[column].null_count() == frame.height:
        raise CompareError(
            f"--metric {metric}: no run has a metric of that name; use one of "
            f"{', '.join(RESULT_COLUMNS)} or an MLflow metric key such as train/loss"
        )
    return frame


def _check_store(uri: str) -> None:
    """Refuse a store that cannot be read, without creating anything."""
    from stackwise.tracking.store import check_tracking_uri, sqlite_path

    problem = check_tracking_uri(uri)
    if problem is not None:
        raise CompareError(problem)
    database = sqlite_path(uri)
    if database is not None and not database.exists():
        raise CompareError(f"no tracking store at {database} (nothing has been run there yet)")


def _get_experiment(client: MlflowClient, uri: str, name: str) -> Any:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        hint = f"; experiments in the store: {', '.join(known)}" if known else ""
        raise CompareError(f"no experiment named {name!r} in {uri}{hint}")
    return experiment


# --------------------------------------------------------------------------------------------
# shaping and formatting
# --------------------------------------------------------------------------------------------


def parse_pivot(text: str) -> tuple[str, str]:
    """``"size x mode"``, ``"size,mode"`` or ``"size×mode"`` -> ("size", "mode")."""
    parts = [p for p in re.split(r"\s*(?:,|×|\s+x\s+|\s+)\s*", text.strip()) if p]
    if len(parts) != 2:
        raise CompareError(
            f"--pivot needs two columns, e.g. 'size x mode' or 'size,mode'; got {text!r}"
        )
    return parts[0], parts[1]


def pivot_frame(frame: pl.DataFrame, pivot: str, metric: str | None = None) -> pl.DataFrame:
    """Rows = first pivot column, columns = second, cells = `metric` (default val_loss)."""
    rows, columns = parse_pivot(pivot)
    value = resolve_metric(metric)
    for name in (rows, columns, value):
        if name not in frame.columns:
            raise CompareError(
                f"unknown column {name!r} for --pivot/--metric; columns: {', '.join(frame.columns)}"
            )
    return frame.pivot(
        on=columns, index=rows, values=value, aggregate_function="first", sort_columns=False
    )


# Columns that matter for reading a table; ids and hashes are left out of `table`/`markdown`.
HIDDEN_IN_TABLES = ("run_id", "parent_run_id", "config_hash")


def display_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """What a human table shows: no ids, no experiment column for a single experiment, and no
    ``training_architecture`` column when a ``mode`` axis already says it."""
    hidden = [c for c in HIDDEN_IN_TABLES if c in frame.columns]
    if "experiment" in frame.columns and frame["experiment"].n_unique() <= 1:
        hidden.append("experiment")
    if "mode" in frame.columns and "training_architecture" in frame.columns:
        hidden.append("training_architecture")
    return frame.drop(hidden)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        magnitude = abs(value)
        if magnitude >= 1e6 or (0 < magnitude < 1e-3):
            return f"{value:.3e}"
        if magnitude >= 100:
            return f"{value:,.0f}"
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def to_markdown(frame: pl.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    lines = [header, rule]
    for row in frame.iter_rows():
        lines.append("| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def rich_table(frame: pl.DataFrame, title: str | None = None) -> Any:
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for column in frame.columns:
        numeric = frame.schema[column].is_numeric()
        table.add_column(column, justify="right" if numeric else "left")
    styles = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow", "RUNNING": "cyan"}
    for row in frame.iter_rows(named=True):
        cells = []
        for column, value in row.items():
            text = _cell(value)
            if column == "status" and value in styles:
                text = f"[{styles[value]}]{text}[/]"
            cells.append(text)
        table.add_row(*cells)
    return table


def render(
    frame: pl.DataFrame,
    fmt: str,
    output: str | Path | None = None,
    console: Console | None = None,
    title: str | None = None,
) -> str | None:
    """Write `frame` in `fmt` to `output` (a file) or return/print it.

    ``table`` prints a rich table to `console`; ``csv``, ``markdown`` and ``json`` return the
    text (and also write it when `output` is given); ``parquet`` needs `output`.
    """
    if fmt not in FORMATS:
        raise CompareError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        if output is None:
            raise CompareError("--format parquet writes a binary file: give --output PATH")
        frame.write_parquet(output)
        return None
    if fmt == "table":
        from rich.console import Console

        table = rich_table(display_frame(frame), title)
        if output is not None:
            with open(output, "w", encoding="utf-8") as handle:
                Console(file=handle, width=200).print(table)
            return None
        (console or Console()).print(table)
        return None
    if fmt == "csv":
        text = frame.write_csv()
    elif fmt == "markdown":
        text = to_markdown(display_frame(frame))
    else:
        text = frame.write_json()
    if output is not None:
        Path(output).write_text(text, encoding="utf-8")
    return text


# --------------------------------------------------------------------------------------------
# plots (PNG artifacts of a parent run)
# --------------------------------------------------------------------------------------------


def save_plots(client: MlflowClient, frame: pl.DataFrame, folder: str | Path) -> list[Path]:
    """``loss_over_tokens.png`` (train loss vs tokens, one panel per training mode) and
    ``val_loss_memory.png`` (final val loss and peak memory by size x mode) into `folder`."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if frame.is_empty():
        return written
    mode_column = "mode" if "mode" in frame.columns else "training_architecture"
    modes = [m for m in frame[mode_column].unique(maintain_order=True).to_list() if m]

    figure, axes_list = plt.subplots(
        1, max(1, len(modes)), figsize=(5 * max(1, len(modes)), 4), squeeze=False
    )
    for axis, mode in zip(axes_list[0], modes or [None], strict=False):
        subset = frame if mode is None else frame.filter(pl.col(mode_column) == mode)
        for row in subset.iter_rows(named=True):
            losses = client.get_metric_history(row["run_id"], "train/loss")
            tokens = {
                m.step: m.value for m in client.get_metric_history(row["run_id"], "train/tokens")
            }
            points = sorted((m.step, m.value) for m in losses)
            xs = [tokens.get(step, float(step)) for step, _ in points]
            axis.plot(xs, [v for _, v in points], label=row["run"])
        axis.set_title(f"train loss ({mode})" if mode else "train loss")
        axis.set_xlabel("tokens")
        axis.set_ylabel("loss")
        axis.legend(fontsize=7)
    written.append(_save_figure(figure, folder / "loss_over_tokens.png"))

    size_column = "size"
    sizes = [s for s in frame[size_column].unique(maintain_order=True).to_list() if s]
    figure, (loss_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(modes))
    for index, mode in enumerate(modes):
        subset = frame.filter(pl.col(mode_column) == mode)
        by_size = {r[size_column]: r for r in subset.iter_rows(named=True)}
        xs = [i + index * width for i in range(len(sizes))]
        loss = [_nan(by_size.get(s, {}).get("val_loss")) for s in sizes]
        memory = [_nan(by_size.get(s, {}).get("peak_memory_mb")) for s in sizes]
        loss_axis.bar(xs, loss, width, label=mode)
        memory_axis.bar(xs, memory, width, label=mode)
    for axis, label in ((loss_axis, "final val loss"), (memory_axis, "peak memory (MiB)")):
        axis.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(sizes))], sizes)
        axis.set_xlabel("size")
        axis.set_ylabel(label)
        axis.set_title(f"{label} by size x mode")
        axis.legend(fontsize=7)
    written.append(_save_figure(figure, folder / "val_loss_memory.png"))
    return written


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _save_figure(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
