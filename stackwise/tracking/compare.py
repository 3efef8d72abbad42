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
   against executed FLOPs and against tokens (all runs on one axis, stage boundaries marked),
   and final validation loss against peak memory (labelled points).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import polars as pl

from stackwise.analysis.plots import MODE_COLOURS, SPARE_COLOURS
from stackwise.tracking.logger import (
    TAG_CONFIG_HASH,
    TAG_GRID_PREFIX,
    TAG_PARENT,
    TAG_POINT,
    TAG_ROLE,
    TAG_RUN_NAME,
    TAG_SEED,
    TAG_TUNE_PREFIX,
    run_destination,
)
from stackwise.tracking.store import resolve_tracking_uri
from stackwise.tracking.tables import Column, print_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from rich.console import Console

    from stackwise.config.experiment import RunSpec

FORMATS = ("table", "csv", "markdown", "json", "parquet")
AGGREGATIONS = ("mean", "min", "max", "last", "std", "sem", "count")
# Bookkeeping column: the tuned settings' column names (see `stackwise.tracking.evidence`).
TUNED_AXES = "tuned_axes"

# Result columns: name in the frame -> MLflow metric (summary metrics of a finished run).
RESULT_COLUMNS: dict[str, str] = {
    "val_loss": "final_val_loss",
    "test_loss": "final_test_loss",
    "perplexity": "final_val_perplexity",
    "flops": "flops",
    "tokens_seen": "tokens_seen",
    "unique_tokens": "unique_tokens",
    "tokens_per_s": "tokens_per_s",
    "peak_memory_mb": "peak_memory_bytes",
    "training_memory_mb": "training_memory_bytes",
    "cache_memory_mb": "cache_memory_bytes",
    "cache_disk_mb": "cache_disk_bytes",
    "wall_time_s": "wall_time_s",
    "epochs": "epochs",
    "parameters": "parameters",
}
INTEGER_COLUMNS = ("tokens_seen", "unique_tokens", "parameters")
# Friendly names accepted by `--metric`.
METRIC_ALIASES: dict[str, str] = {
    "loss": "val_loss",
    "final_val_loss": "val_loss",
    "val/loss": "val_loss",
    "final_test_loss": "test_loss",
    "test/loss": "test_loss",
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
# The depth-wise head setting, shown as the `head` column (blank for rackwise runs).
HEAD_PARAM = "training.depthwise.head"


class CompareError(ValueError):
    """A user mistake in a compare request (unknown experiment, column, format …)."""


@dataclass
class ExperimentRef:
    """An experiment to compare: its MLflow name, the store it lives in and, when it was named
    by a file, the file's grid points as resolved now (grid order)."""

    name: str
    tracking_uri: str
    specs: list[RunSpec] | None = None


def resolve_experiments(
    items: Sequence[str],
    tracking_uri: str | None = None,
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
) -> list[ExperimentRef]:
    """Experiment files or names -> MLflow experiment names, stores and current grid points.

    An item that is an existing file (or ends in .yaml/.yml) is loaded and expanded exactly as
    `stackwise run` would (with `overrides` and `only`): each grid point goes with its
    experiment (``tracking.experiment_name`` or the file's ``name``) and store
    (``tracking.uri``). Anything else is an MLflow experiment name. Raises `ConfigError` for a
    bad file.
    """
    from stackwise.config.experiment import expand_grid, load_experiment

    files = [i for i in items if Path(i).is_file() or i.endswith((".yaml", ".yml"))]
    if (overrides or only) and not files:
        flag = "--set" if overrides else "--only"
        raise CompareError(
            f"{flag} resolves an experiment file as `stackwise run` would; {items[0]!r} is an "
            "experiment name: give its file instead"
        )
    refs: dict[tuple[str, str], ExperimentRef] = {}
    for item in items:
        if item not in files:
            key = (item, resolve_tracking_uri(tracking_uri))
            refs.setdefault(key, ExperimentRef(*key))
            continue
        experiment = load_experiment(item)
        specs = expand_grid(experiment, overrides, only, strict_only=len(files) == 1)
        if not specs:
            # The file's experiment is still named: notes and --all can speak of it.
            key = (experiment.config.name, resolve_tracking_uri(tracking_uri))
            refs.setdefault(key, ExperimentRef(*key, specs=[]))
        for spec in specs:
            key = run_destination(spec, tracking_uri)
            ref = refs.setdefault(key, ExperimentRef(*key, specs=[]))
            if ref.specs is None:  # named directly too: the file's settings decide
                ref.specs = []
            ref.specs.append(spec)
    if only and files and not any(ref.specs for ref in refs.values()):
        raise CompareError(f"--only {' --only '.join(only)}: no run of the given files matches")
    return list(refs.values())


def current_identity(spec: RunSpec, fingerprints: dict[str, str] | None = None) -> str:
    """The identity (``config_hash`` tag) `stackwise run` gives this grid point on this machine
    now, composed as `stackwise.runner.point_of` composes it: the config with `data.paths`
    resolved against the file's folder, the content of the data, and the device type.

    Raises `CompareError` when the data files are gone (the identity needs their content).
    Nothing is written: data files are hashed without the runner's fingerprint cache, once per
    data config when `fingerprints` (data config JSON -> fingerprint) is shared between calls.
    """
    from stackwise.identity import data_fingerprint, resolve_data_paths, run_identity

    config = resolve_data_paths(spec.config, Path(spec.file).resolve().parent)
    memo = {} if fingerprints is None else fingerprints
    key = config.data.model_dump_json()
    if key not in memo:
        try:
            memo[key] = data_fingerprint(config.data)
        except OSError as error:
            raise CompareError(
                f"{spec.file}: {spec.name}: cannot tell its current runs without its data ({error})"
            ) from error
    return run_identity(config, _device_type(config.training.device), memo[key])


def _device_type(name: str) -> str:
    """The device type a `training.device` value trains on here (`auto` resolved)."""
    import torch

    if name != "auto":
        return torch.device(name).type
    from stackwise.training.device import resolve_device

    return resolve_device(name).type


def resolve_metric(metric: str | None) -> str:
    """A `--metric` value -> frame column name (aliases allowed; other names are MLflow keys)."""
    if metric is None:
        return DEFAULT_METRIC
    return METRIC_ALIASES.get(metric, metric)


def _search_point_runs(
    client: MlflowClient, experiment_ids: list[str], run_ids: Iterable[str] | None = None
) -> list[Run]:
    """All grid-point runs of the experiments (every page), oldest first."""
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


def _config_hash(run: Run) -> str:
    return run.data.tags.get(TAG_CONFIG_HASH, run.info.run_id)


def _point_name(run: Run) -> str:
    return run.data.tags.get(TAG_RUN_NAME) or run.info.run_name or run.info.run_id


def _latest(runs: Sequence[Run]) -> Run:
    """The latest FINISHED run of `runs` (oldest first), else the latest attempt."""
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or list(runs))[-1]


def _grouped(runs: Sequence[Run], key: Callable[[Run], str]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def select_runs(
    runs: Sequence[Run], current: Sequence[str] | None, label: str, notes: list[str] | None = None
) -> list[Run]:
    """The runs the default view shows, in grid order (`runs` oldest first).

    With `current` (run identities of a file's grid points, grid order): per hash its latest
    FINISHED run, else its latest attempt. Without: the same per grid point (run name). What is
    left out, and grid points that have no run yet, are reported in `notes` under `label`.
    """
    if current is None:
        chosen = [_latest(group) for group in _grouped(runs, _point_name).values()]
    else:
        by_hash = _grouped(runs, _config_hash)
        chosen = [_latest(by_hash[h]) for h in current if h in by_hash]
        missing = len([h for h in current if h not in by_hash])
        if missing and notes is not None:
            notes.append(
                f"{label}: {_plural(missing, 'grid point')} of the current settings "
                f"{'has' if missing == 1 else 'have'} no run yet (stackwise run starts them)"
            )
    left_out = len(runs) - len(chosen)
    if left_out and notes is not None:
        shown = {_config_hash(r) for r in chosen}
        other = len([r for r in runs if _config_hash(r) not in shown])
        parts = []
        if other:
            parts.append(_plural(other, "run") + " of other settings")
        if left_out - other:
            parts.append(_plural(left_out - other, "other attempt"))
        notes.append(f"{label}: not shown: {' and '.join(parts)}; --all lists every run")
    return chosen


def _all_in_point_order(runs: Sequence[Run], chosen: Sequence[Run]) -> list[Run]:
    """Every run, grouped by grid point (points in the order of `chosen`, then the rest), each
    point's runs oldest first."""
    groups = _grouped(runs, _point_name)
    order = list(dict.fromkeys([_point_name(r) for r in chosen] + list(groups)))
    return [run for name in order for run in groups[name]]


def _differing_params(runs: Sequence[Run]) -> list[str]:
    """Param keys whose value differs between runs of one grid point (a missing param counts
    as a value), sorted."""
    keys: set[str] = set()
    for group in _grouped(runs, _point_name).values():
        if len(group) < 2:
            continue
        for key in set().union(*(r.data.params for r in group)):
            if len({r.data.params.get(key) for r in group}) > 1:
                keys.add(key)
    return sorted(keys)


def _start_time(run: Run) -> datetime | None:
    start = run.info.start_time
    return None if start is None else datetime.fromtimestamp(start / 1000).replace(microsecond=0)


def runs_frame(
    client: MlflowClient,
    experiment_ids: dict[str, str],
    run_ids: Iterable[str] | None = None,
    metric: str | None = None,
    latest_only: bool = True,
    current: Mapping[str, Sequence[str] | None] | None = None,
    all_runs: bool = False,
    notes: list[str] | None = None,
) -> pl.DataFrame:
    """The comparison frame for experiments ``{id: name}`` (optionally only some run ids).

    `current` maps an experiment id to the run identities of its grid points as a file resolves
    them now (see `select_runs`); `latest_only=False` keeps every run found, in start order;
    `all_runs` keeps every run too, grouped by grid point, with the ``current`` column and a
    column per param that differs between runs of one grid point.
    """
    found = _search_point_runs(client, list(experiment_ids), run_ids)
    current = current or {}
    runs: list[Run] = []
    chosen_ids: set[str] = set()
    for experiment_id, name in experiment_ids.items():
        mine = [r for r in found if r.info.experiment_id == experiment_id]
        if not latest_only and not all_runs:
            runs.extend(mine)
            continue
        chosen = select_runs(mine, current.get(experiment_id), name, None if all_runs else notes)
        chosen_ids.update(r.info.run_id for r in chosen)
        runs.extend(_all_in_point_order(mine, chosen) if all_runs else chosen)
    differing = _differing_params(runs) if all_runs else []

    metric_column = resolve_metric(metric)
    extra_metric = None if metric_column in RESULT_COLUMNS else metric_column
    axes: list[str] = []
    tuned: list[str] = []
    for run in runs:
        for key in run.data.tags:
            if key.startswith(TAG_GRID_PREFIX) and key[len(TAG_GRID_PREFIX) :] not in axes:
                axes.append(key[len(TAG_GRID_PREFIX) :])
            if key.startswith(TAG_TUNE_PREFIX) and key[len(TAG_TUNE_PREFIX) :] not in tuned:
                tuned.append(key[len(TAG_TUNE_PREFIX) :])
    replicated = any(TAG_SEED in run.data.tags for run in runs)
    fixed = [c for c in ("training_architecture", "objective", "size") if c not in axes]
    if "head" not in axes and any(HEAD_PARAM in r.data.params for r in runs):
        fixed.append("head")
    differing = [k for k in differing if not k.startswith(TAG_GRID_PREFIX)]

    rows: list[dict[str, Any]] = []
    for run in runs:
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        row: dict[str, Any] = {
            "experiment": experiment_ids.get(run.info.experiment_id, run.info.experiment_id),
            "run": _point_name(run),
        }
        for axis in axes:
            row[axis] = tags.get(f"{TAG_GRID_PREFIX}{axis}")
        for axis in tuned:
            row[axis] = tags.get(f"{TAG_TUNE_PREFIX}{axis}")
        if replicated or tuned:
            seed = tags.get(TAG_SEED, params.get("training.seed"))
            row["seed"] = None if seed is None else int(seed)
            row["point"] = tags.get(TAG_POINT, _point_name(run))
        for column in fixed:
            row[column] = tags.get(column)
        if "head" in fixed:
            depthwise = tags.get("training_architecture") in ("stackwise", "blockwise", "layerwise")
            row["head"] = params.get(HEAD_PARAM) if depthwise else None
        for key in differing:
            row[key] = params.get(key)
        if all_runs:
            row["current"] = "yes" if run.info.run_id in chosen_ids else "no"
        row["status"] = run.info.status
        for column, key in RESULT_COLUMNS.items():
            value = metrics.get(key)
            if value is not None and column.endswith("_mb"):
                value = value / 2**20
            row[column] = value
        if extra_metric is not None:
            row[extra_metric] = metrics.get(extra_metric)
        row["start_time"] = _start_time(run)
        row["config_hash"] = tags.get(TAG_CONFIG_HASH)
        row["run_id"] = run.info.run_id
        row["parent_run_id"] = tags.get(TAG_PARENT)
        if tuned:
            row[TUNED_AXES] = ",".join(tuned)
        rows.append(row)

    schema: dict[str, Any] = {"experiment": pl.String, "run": pl.String}
    schema.update({axis: pl.String for axis in axes})
    schema.update({axis: pl.String for axis in tuned})
    if replicated or tuned:
        schema.update({"seed": pl.Int64, "point": pl.String})
    schema.update({column: pl.String for column in fixed})
    schema.update({key: pl.String for key in differing})
    if all_runs:
        schema["current"] = pl.String
    schema["status"] = pl.String
    schema.update({column: pl.Float64 for column in RESULT_COLUMNS})
    if extra_metric is not None:
        schema[extra_metric] = pl.Float64
    schema.update(
        {
            "start_time": pl.Datetime("ms"),
            "config_hash": pl.String,
            "run_id": pl.String,
            "parent_run_id": pl.String,
        }
    )
    if tuned:
        schema[TUNED_AXES] = pl.String
    frame = pl.DataFrame(rows, schema=schema, orient="row")
    return frame.with_columns(pl.col(c).round().cast(pl.Int64) for c in INTEGER_COLUMNS)


def compare_runs(
    experiments: Sequence[str],
    tracking_uri: str | None = None,
    metric: str | None = None,
    notes: list[str] | None = None,
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
    all_runs: bool = False,
    clients: dict[str, MlflowClient] | None = None,
) -> pl.DataFrame:
    """The runs of the given experiments (files or MLflow experiment names), one row each.

    Which runs: see the module docstring (files are resolved with `overrides` and `only` as
    `stackwise run` resolves them; `all_runs` shows every run). Columns: ``experiment``,
    ``run``, one column per grid axis, ``training_architecture``, ``objective``, ``size``
    (unless an axis already has that name), ``head`` (depth-wise runs that record it), with
    `all_runs` the differing params and ``current``, then ``status``, the result columns
    (`RESULT_COLUMNS`), the `metric` when it is another MLflow metric, ``start_time``,
    ``config_hash``, ``run_id`` and ``parent_run_id``.

    Lines about runs not shown go to `notes` when given. Raises `CompareError` for an
    experiment the store does not have; when `notes` is given and several experiments are
    named, one that has not been run yet is left out with a line in `notes` instead, as long
    as at least one is found. `clients`, when given, receives ``run id -> MlflowClient`` of its
    store (for plots).
    """
    from mlflow import MlflowClient

    refs = resolve_experiments(experiments, tracking_uri, overrides, only)
    if not refs:
        raise CompareError("name at least one experiment file or MLflow experiment")
    lenient = notes is not None and len(refs) > 1
    frames = []
    missing: list[CompareError] = []
    by_store: dict[str, list[ExperimentRef]] = {}
    for ref in refs:
        by_store.setdefault(ref.tracking_uri, []).append(ref)
    fingerprints: dict[str, str] = {}
    for uri, store_refs in by_store.items():
        _check_store(uri)
        # Opening a client on a SQLite URI creates the database: only after the checks above.
        client = MlflowClient(tracking_uri=uri)
        ids: dict[str, str] = {}
        current: dict[str, Sequence[str] | None] = {}
        for ref in store_refs:
            try:
                experiment = _get_experiment(client, uri, ref.name)
            except CompareError as error:
                if not lenient:
                    raise
                missing.append(error)
                continue
            ids[str(experiment.experiment_id)] = ref.name
            if ref.specs is not None:
                identities = [current_identity(spec, fingerprints) for spec in ref.specs]
                current[str(experiment.experiment_id)] = list(dict.fromkeys(identities))
            else:
                current[str(experiment.experiment_id)] = None
        if ids:
            frame = runs_frame(
                client, ids, metric=metric, current=current, all_runs=all_runs, notes=notes
            )
            frames.append(frame)
            if clients is not None:
                clients.update(dict.fromkeys(frame["run_id"].to_list(), client))
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


def select_columns(frame: pl.DataFrame, columns: str) -> pl.DataFrame:
    """The columns named in `columns` (comma-separated), in that order, behind the columns that
    say which run a row is: experiment and run (or a pivot's rows) and, in an ``--all`` frame,
    the params that differ between runs of one grid point and ``current`` — without them two
    runs of one point would print as the same row. Unknown names are a `CompareError` listing
    the columns there are."""
    wanted = [c.strip() for c in columns.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in frame.columns]
    if unknown:
        raise CompareError(
            f"--columns: no column {', '.join(repr(c) for c in unknown)}; the table has "
            f"{', '.join(frame.columns)}"
        )
    keep = [c for c in ("experiment", "run") if c in frame.columns] or frame.columns[:1]
    if "current" in frame.columns:  # an --all frame: differing params (dotted keys), current
        before = frame.columns[: frame.columns.index("current")]
        keep += [c for c in before if "." in c and c not in keep] + ["current"]
    return frame.select([*keep, *[c for c in wanted if c not in keep]])


def parse_pivot(text: str) -> tuple[str, str]:
    """``"size x mode"``, ``"size,mode"`` or ``"size×mode"`` -> ("size", "mode")."""
    parts = [p for p in re.split(r"\s*(?:,|×|\s+x\s+|\s+)\s*", text.strip()) if p]
    if len(parts) != 2:
        raise CompareError(
            f"--pivot needs two columns, e.g. 'size x mode' or 'size,mode'; got {text!r}"
        )
    return parts[0], parts[1]


def pivot_frame(
    frame: pl.DataFrame, pivot: str, metric: str | None = None, agg: str | None = None
) -> pl.DataFrame:
    """Rows = first pivot column, columns = second, cells = `metric` (default val_loss).

    A cell holding more than one run is a `CompareError` naming what differs inside it (other
    axes, params, or reruns of the same settings), unless `agg` (mean, min, max, std, sem,
    count, or last: the latest started run) says how to combine them.
    """
    rows, columns = parse_pivot(pivot)
    value = resolve_metric(metric)
    for name in (rows, columns, value):
        if name not in frame.columns:
            raise CompareError(
                f"unknown column {name!r} for --pivot/--metric; columns: {', '.join(frame.columns)}"
            )
    if agg is not None and agg not in AGGREGATIONS:
        raise CompareError(f"--agg {agg}: use one of {', '.join(AGGREGATIONS)}")
    if agg is None:
        crowded = frame.group_by(rows, columns, maintain_order=True).len().filter(pl.col("len") > 1)
        if crowded.height:
            raise CompareError(_crowded_cells(frame, rows, columns, value, crowded, pivot))
    how: Any = cast(Literal["first", "mean", "min", "max", "last"], agg or "first")
    if agg == "std":
        how = pl.element().std()
    elif agg == "sem":
        how = pl.element().std() / pl.element().count().sqrt()
    elif agg == "count":
        how = "len"
    if agg != "last" or "start_time" not in frame.columns:
        return frame.pivot(
            on=columns, index=rows, values=value, aggregate_function=how, sort_columns=False
        )
    # The latest started run of each cell; rows and columns keep the frame's order.
    row_order = frame[rows].unique(maintain_order=True).to_list()
    column_order = [str(c) for c in frame[columns].unique(maintain_order=True).to_list()]
    latest = frame.sort("start_time", maintain_order=True, nulls_last=False)
    table = latest.pivot(on=columns, index=rows, values=value, aggregate_function="last")
    position = {key: index for index, key in enumerate(row_order)}
    return (
        table.with_columns(pl.col(rows).replace_strict(position, default=None).alias("_order"))
        .sort("_order")
        .select(rows, *[c for c in column_order if c in table.columns])
    )


# Columns that never explain why two runs share a pivot cell (results, ids, bookkeeping).
_NOT_A_DIFFERENCE = ("run", "status", "current", "start_time", "config_hash", "run_id")


def _crowded_cells(
    frame: pl.DataFrame,
    rows: str,
    columns: str,
    value: str,
    crowded: pl.DataFrame,
    pivot: str,
) -> str:
    """One line: which pivot cells hold several runs, and the columns whose values differ."""
    candidates = [
        c
        for c in frame.columns
        if c not in (rows, columns, value, "parent_run_id", *_NOT_A_DIFFERENCE)
        and c not in RESULT_COLUMNS
        and not frame.schema[c].is_numeric()
    ]
    differing: dict[str, list[str]] = {}
    hashes_differ = False
    for cell in crowded.iter_rows(named=True):
        inside = frame.filter(
            pl.col(rows).eq_missing(cell[rows]) & pl.col(columns).eq_missing(cell[columns])
        )
        for column in candidates:
            values = [_cell(v) for v in inside[column].unique(maintain_order=True).to_list()]
            if len(values) > 1:
                seen = differing.setdefault(column, [])
                seen.extend(v for v in values if v not in seen)
        if "config_hash" in inside.columns and inside["config_hash"].n_unique() > 1:
            hashes_differ = True
    if differing:
        what = "; ".join(f"{c} ({', '.join(v)})" for c, v in differing.items())
    elif hashes_differ:
        what = "settings outside the table (config_hash; compare --all shows the params)"
    else:
        what = "nothing but their start time (reruns of the same settings)"
    first = crowded.row(0, named=True)
    cells = _plural(crowded.height, "cell")
    return (
        f"--pivot {pivot}: {cells} hold several runs (e.g. {rows}={first[rows]}, "
        f"{columns}={first[columns]}: {first['len']} runs); they differ in {what}. Keep one run "
        f"per cell with --only, or combine them with --agg {'|'.join(AGGREGATIONS)}"
    )


# Columns that matter for reading a table; ids are left out of `table`/`markdown`, and the
# start time and config hash too unless every run is shown (`--all`).
HIDDEN_IN_TABLES = ("run_id", "parent_run_id", "tuned_axes")
SHOWN_WITH_ALL = ("start_time", "config_hash")


def display_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """What a human table shows: no ids, no experiment column for a single experiment, and no
    ``training_architecture`` column when a ``mode`` axis already says it. A frame of every run
    (it has the ``current`` column) keeps start time and config hash, which tell its runs apart."""
    hidden = [c for c in HIDDEN_IN_TABLES if c in frame.columns]
    if "current" not in frame.columns:
        hidden.extend(c for c in SHOWN_WITH_ALL if c in frame.columns)
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


STATUS_STYLES = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow", "RUNNING": "cyan"}
_KEY_COLUMNS = ("experiment", "run")


def table_cells(frame: pl.DataFrame) -> tuple[list[Column], list[list[str]]]:
    """The frame as table columns and formatted cells (numbers right-aligned, names as keys)."""
    columns = [
        Column(name, numeric=frame.schema[name].is_numeric(), key=name in _KEY_COLUMNS)
        for name in frame.columns
    ]
    rows = [[_cell(value) for value in row] for row in frame.iter_rows()]
    return columns, rows


def print_frame(frame: pl.DataFrame, console: Console, title: str | None = None) -> None:
    """The frame as a table that never cuts a run name or a number (see `print_table`)."""
    columns, rows = table_cells(frame)
    print_table(console, columns, rows, title=title, styles={"status": STATUS_STYLES})


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

        shown = display_frame(frame)
        if output is not None:
            with open(output, "w", encoding="utf-8") as handle:
                print_frame(shown, Console(file=handle), title)  # a file: plain full rows
            return None
        print_frame(shown, console or Console(), title)
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
# plots (PNG artifacts of a parent run, and `stackwise compare --plot DIR`)
# --------------------------------------------------------------------------------------------

PLOT_FILES = ("loss_over_flops.png", "loss_over_tokens.png", "val_loss_memory.png")
# Colour by training mode, as in the frontier plot (blockwise and layerwise are the same
# thing); other modes, and mode labels a preset axis invents, take the spare colours in order.
LINE_STYLES: tuple[Any, ...] = (
    "-",
    "--",
    ":",
    "-.",
    (0, (5, 1)),
    (0, (3, 1, 1, 1, 1, 1)),
    (0, (1, 3)),
    (0, (8, 3, 2, 3)),
)
POINT_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
STAGE_MARKER = "D"
# Columns that describe a run but are not grid coordinates (they never pick a line style).
_NOT_STYLE = (
    "run",
    "status",
    "current",
    "start_time",
    "config_hash",
    "run_id",
    "parent_run_id",
    "training_architecture",
)

# (run id, metric key) -> [(step, value)], oldest step first.
MetricHistory = Callable[[str, str], list[tuple[int, float]]]


@dataclass
class RunCurve:
    """What the plots draw for one run: its validation curve, the cumulative tokens and FLOPs
    logged with the train metrics (the x axes), stage boundaries, and its final results."""

    label: str
    mode: str
    style: str  # the run's other grid coordinates, e.g. "size=small"; picks line style/marker
    val: list[tuple[int, float]]
    tokens: list[tuple[int, float]]
    flops: list[tuple[int, float]]
    stage_starts: list[int] = field(default_factory=list)  # steps where stages 2… begin
    final_val_loss: float | None = None
    final_tokens: float | None = None
    final_flops: float | None = None
    peak_memory_mb: float | None = None
    # Replicates (runs of one grid point and tuned values that differ only in their seed) share
    # a group: the loss plot draws their mean with a min-max band.
    group: str | None = None


def client_history(clients: MlflowClient | Mapping[str, MlflowClient]) -> MetricHistory:
    """A `MetricHistory` reading one store, or each run's own store (``run id -> client``)."""

    def history(run_id: str, key: str) -> list[tuple[int, float]]:
        client = clients[run_id] if isinstance(clients, Mapping) else clients
        by_step = {int(m.step): float(m.value) for m in client.get_metric_history(run_id, key)}
        return sorted(by_step.items())

    return history


def load_curves(frame: pl.DataFrame, history: MetricHistory) -> list[RunCurve]:
    """One `RunCurve` per row of a comparison frame, in its order."""
    mode_column = "mode" if "mode" in frame.columns else "training_architecture"
    style_columns = [
        c
        for c in frame.columns
        if c != mode_column
        and c not in (*_NOT_STYLE, "point", "tuned_axes")
        and c not in RESULT_COLUMNS
        and frame.schema[c] == pl.String
        and frame[c].drop_nulls().n_unique() > 1  # blank where it does not apply (head)
    ]
    names = frame["run"].to_list() if "run" in frame.columns else []
    repeated = len(set(names)) < len(names)
    curves: list[RunCurve] = []
    for row in frame.iter_rows(named=True):
        run_id = row["run_id"]
        label = str(row.get("run") or run_id)
        if "experiment" in style_columns:
            label = f"{row['experiment']}/{label}"
        if repeated and row.get("config_hash"):
            label = f"{label} [{str(row['config_hash'])[:7]}]"
        stages = history(run_id, "stage/index")
        group = None
        if row.get("seed") is not None and "point" in frame.columns:
            group = label.removesuffix(f",seed={row['seed']}")
        curves.append(
            RunCurve(
                group=group,
                label=label,
                mode=str(row.get(mode_column) or "?"),
                style=", ".join(f"{c}={row[c]}" for c in style_columns if row[c] is not None),
                val=history(run_id, "val/loss"),
                tokens=history(run_id, "train/tokens"),
                flops=history(run_id, "train/flops"),
                stage_starts=[step for step, index in stages if index > 0],
                final_val_loss=row.get("val_loss"),
                final_tokens=_final_tokens(row, history),
                final_flops=row.get("flops"),
                peak_memory_mb=row.get("peak_memory_mb"),
            )
        )
    return curves


def _final_tokens(row: dict[str, Any], history: MetricHistory) -> float | None:
    """Training tokens of a finished run: ``tokens_seen``, else (older runs) ``total_tokens``."""
    if row.get("tokens_seen") is not None:
        return float(row["tokens_seen"])
    series = history(row["run_id"], "total_tokens")
    return series[-1][1] if series else None


def _at(series: Sequence[tuple[int, float]], step: int) -> float:
    """The cumulative value of `series` at `step`: exact where logged, linear in between (within
    a stage the cost per step is constant, and each stage end is logged), proportional to the
    step before the first and after the last point."""
    import bisect

    steps = [s for s, _ in series]
    index = bisect.bisect_left(steps, step)
    if index < len(steps) and steps[index] == step:
        return series[index][1]
    if index == 0:
        first_step, first = series[0]
        return first * step / first_step if first_step else first
    if index == len(steps):
        last_step, last = series[-1]
        return last * step / last_step if last_step else last
    (s0, v0), (s1, v1) = series[index - 1], series[index]
    return v0 + (v1 - v0) * (step - s0) / (s1 - s0)


def _curve_points(curve: RunCurve, x: str) -> tuple[list[float], list[float], list[int]]:
    """x values, val losses and the indices of stage-boundary points of one run's curve.

    A run without the per-step series (recorded before it was logged) is drawn as its final
    point only, when it has the summary value: nothing is guessed."""
    series = curve.flops if x == "flops" else curve.tokens
    final = curve.final_flops if x == "flops" else curve.final_tokens
    if not series:
        if final is None or not curve.val:
            return [], [], []
        loss = curve.final_val_loss if curve.final_val_loss is not None else curve.val[-1][1]
        return [final], [loss], []
    xs = [_at(series, step) for step, _ in curve.val]
    ys = [value for _, value in curve.val]
    boundaries = set(curve.stage_starts)
    marks = [i for i, (step, _) in enumerate(curve.val) if step in boundaries]
    return xs, ys, marks


def _palette(curves: Sequence[RunCurve]) -> tuple[dict[str, str], dict[str, int]]:
    """Colour per mode and style index per other-coordinates value, in order of appearance."""
    colours: dict[str, str] = {}
    spare = iter(SPARE_COLOURS * (1 + len(curves) // len(SPARE_COLOURS)))
    for curve in curves:
        if curve.mode not in colours:
            colours[curve.mode] = MODE_COLOURS.get(curve.mode) or next(spare)
    styles = {s: i for i, s in enumerate(dict.fromkeys(c.style for c in curves))}
    return colours, styles


def _new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas (files only; no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _log_axis(axis: Any, values: Sequence[float], which: str = "x") -> None:
    """Log scale with ticks at 1-2-5 (or decades over a wide range), labelled 200k, 1.5G, 2T."""
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v > 0 and math.isfinite(v)]
    getattr(axis, f"set_{which}scale")("log")
    target = axis.xaxis if which == "x" else axis.yaxis
    decades = math.log10(max(positive) / min(positive)) if positive else 0.0
    if decades > 3:
        subs: tuple[float, ...] = (1.0,)
    elif decades > 1:
        subs = (1.0, 2.0, 5.0)
    else:
        subs = tuple(float(s) for s in range(1, 10))
    target.set_major_locator(LogLocator(base=10, subs=subs))
    target.set_major_formatter(EngFormatter(places=None, sep=""))
    target.set_minor_formatter(NullFormatter())
    if positive and decades < 0.3:  # one point, or nearly: keep a readable span around it
        middle = math.sqrt(max(positive) * min(positive))
        getattr(axis, f"set_{which}lim")(middle / 2.5, middle * 2.5)


LEGEND_ROWS = 40  # legend entries in one column; more go in two


def _height(entries: int) -> float:
    """Figure height (inches) that fits a one-column legend of `entries` beside the axes."""
    return max(5.5, 0.19 * min(entries, LEGEND_ROWS) + 1.0)


def _legend_outside(axis: Any, handles: list[Any], title: str | None = None) -> None:
    """A legend right of the axes: it never covers data."""
    axis.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        fontsize=8,
        title=title,
        title_fontsize=8,
        ncol=1 if len(handles) <= LEGEND_ROWS else 2,
        frameon=False,
    )


def _replicate_groups(curves: Sequence[RunCurve]) -> list[list[RunCurve]]:
    """Curves grouped by replicate group (a curve without one is its own group), in order."""
    groups: dict[str, list[RunCurve]] = {}
    for index, curve in enumerate(curves):
        groups.setdefault(curve.group or f"\0{index}", []).append(curve)
    return list(groups.values())


def _mean_curve(
    group: Sequence[RunCurve], x: str
) -> tuple[list[float], list[float], list[float], list[float], list[int]]:
    """x, mean, min and max of the validation losses of replicates, over the evaluation points
    they all have (replicates evaluate at the same steps and FLOPs; a shorter curve, e.g. an
    unfinished run, cuts the others), and the stage-boundary indices of the first."""
    points = [_curve_points(curve, x) for curve in group]
    length = min(len(xs) for xs, _, _ in points)
    xs, _, marks = points[0]
    columns = [[ys[i] for _, ys, _ in points] for i in range(length)]
    means = [sum(c) / len(c) for c in columns]
    return (
        xs[:length],
        means,
        [min(c) for c in columns],
        [max(c) for c in columns],
        [m for m in marks if m < length],
    )


def loss_figure(curves: Sequence[RunCurve], x: str = "flops") -> Figure:
    """Validation loss against executed training FLOPs (`x="flops"`) or training tokens
    (`x="tokens"`): one line per run on one axis, colour by mode, line style by the other grid
    coordinates, diamonds where a depth-wise stage ends and the next begins. Replicates (runs
    that differ only in their seed) are one line, their mean, with a shaded min-max band."""
    from matplotlib.lines import Line2D

    if x not in ("flops", "tokens"):
        raise ValueError(f"x must be 'flops' or 'tokens', not {x!r}")
    groups = _replicate_groups(curves)
    figure = _new_figure(11, _height(len(groups) + 1))
    axis = figure.add_subplot()
    colours, styles = _palette(curves)
    handles: list[Any] = []
    every_x: list[float] = []
    for group in groups:
        curve = group[0]
        if len(group) == 1:
            xs, ys, marks = _curve_points(curve, x)
            label = curve.label if xs else f"{curve.label} (no {x} / validation loss recorded)"
        else:
            xs, ys, low, high, marks = _mean_curve(group, x)
            label = f"{curve.group}: mean of {len(group)} seeds (band: min-max)"
            axis.fill_between(xs, low, high, color=colours[curve.mode], alpha=0.18, linewidth=0)
        every_x.extend(xs)
        (line,) = axis.plot(
            xs,
            ys,
            color=colours[curve.mode],
            linestyle=LINE_STYLES[styles[curve.style] % len(LINE_STYLES)],
            linewidth=1.6,
            # Markers only where a stage ends, or for a run that is a single point.
            marker=STAGE_MARKER if marks else ("o" if len(xs) == 1 else None),
            markevery=marks or None,
            markersize=5,
            label=label,
        )
        handles.append(line)
    if any(_curve_points(c, x)[2] for c in curves):
        handles.append(
            Line2D(
                [],
                [],
                color="black",
                marker=STAGE_MARKER,
                linestyle="",
                markersize=5,
                label="stage boundary (depth-wise)",
            )
        )
    _log_axis(axis, every_x)
    axis.set_xlabel("executed training FLOPs" if x == "flops" else "training tokens seen")
    axis.set_ylabel("validation loss")
    against = "executed training FLOPs" if x == "flops" else "training tokens"
    axis.set_title(f"validation loss vs {against} ({_plural(len(curves), 'run')})")
    if len(groups) < len(curves):
        axis.set_title(
            f"validation loss vs {against} ({_plural(len(curves), 'run')}, "
            f"{_plural(len(groups), 'line')}: replicate seeds averaged)"
        )
    axis.grid(True, which="major", alpha=0.3)
    _legend_outside(axis, handles)
    return figure


NAMED_POINTS = 10  # up to this many points carry their run name; more carry a number


def _final_point(curve: RunCurve) -> tuple[float, float] | None:
    """(peak memory MiB, final val loss) of a run, or None when it has no result."""
    loss = curve.final_val_loss
    if loss is None and curve.val:
        loss = curve.val[-1][1]
    if loss is None or curve.peak_memory_mb is None:
        return None
    return float(curve.peak_memory_mb), float(loss)


def memory_figure(curves: Sequence[RunCurve]) -> Figure:
    """Final validation loss against peak memory: one labelled point per run, colour by mode,
    marker by the other grid coordinates. Beyond `NAMED_POINTS` runs a point carries a number
    and the legend names it (long names would bury the points)."""
    from matplotlib.lines import Line2D

    colours, styles = _palette(curves)
    points = [_final_point(curve) for curve in curves]
    present = [(c, p) for c, p in zip(curves, points, strict=True) if p is not None]
    numbered = len(present) > NAMED_POINTS
    shown_styles = [s for s in styles if s] if len(styles) > 1 else []
    missing = [c.label for c, p in zip(curves, points, strict=True) if p is None]
    entries = len(colours) + len(shown_styles) + (len(present) if numbered else 0) + len(missing)
    figure = _new_figure(11, _height(entries))
    axis = figure.add_subplot()
    for curve, point in zip(curves, points, strict=True):
        axis.plot(
            [point[0]] if point else [],
            [point[1]] if point else [],
            linestyle="",
            marker=POINT_MARKERS[styles[curve.style] % len(POINT_MARKERS)],
            markersize=8,
            color=colours[curve.mode],
            label=curve.label if point else f"{curve.label} (no result)",
        )
    memory = [p[0] for _, p in present]
    if memory and max(memory) / max(min(memory), 1e-9) > 20:
        _log_axis(axis, memory)
    axis.set_xlabel("peak memory (MiB)")
    axis.set_ylabel("final validation loss")
    axis.set_title(f"final validation loss vs peak memory ({_plural(len(curves), 'run')})")
    axis.grid(True, alpha=0.3)
    axis.margins(x=0.15, y=0.12)
    names = [str(i + 1) if numbered else c.label for i, (c, _) in enumerate(present)]
    _label_points(figure, axis, [(n, *p) for n, (_, p) in zip(names, present, strict=True)])
    handles: list[Any] = [
        Line2D([], [], color=c, marker="o", linestyle="", markersize=7, label=mode)
        for mode, c in colours.items()
    ]
    handles += [
        Line2D(
            [],
            [],
            color="grey",
            marker=POINT_MARKERS[styles[style] % len(POINT_MARKERS)],
            linestyle="",
            markersize=7,
            label=style,
        )
        for style in shown_styles
    ]
    if numbered:
        handles += [
            Line2D([], [], linestyle="", label=f"{number}: {curve.label}")
            for number, (curve, _) in zip(names, present, strict=True)
        ]
    handles += [Line2D([], [], linestyle="", label=f"no result: {name}") for name in missing]
    _legend_outside(axis, handles, title="mode / coordinates" if shown_styles else "mode")
    return figure


def _label_points(figure: Any, axis: Any, points: Sequence[tuple[str, float, float]]) -> None:
    """Name each point beside it (left of points in the right part of the axes, so a label stays
    inside), moving labels down until none overlaps another."""
    from matplotlib.text import Text

    figure.canvas.draw()  # settles the axis limits, hence where each point lands
    renderer = figure.canvas.get_renderer()
    to_axes = axis.transData + axis.transAxes.inverted()
    # A thin leader line from each label to its point, visible once a label has moved away.
    leader = {"arrowstyle": "-", "color": "grey", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 4}
    texts, sides = [], []
    for label, x, y in points:
        side = -1.0 if to_axes.transform((x, y))[0] > 0.6 else 1.0
        sides.append(side)
        texts.append(
            axis.annotate(
                label,
                (x, y),
                xytext=(6 * side, 4),
                textcoords="offset points",
                ha="left" if side > 0 else "right",
                fontsize=7,
                arrowprops=leader,
            )
        )
    figure.canvas.draw()  # lays the new labels out
    points_per_pixel = 72.0 / figure.dpi
    order = sorted(range(len(texts)), key=lambda i: -points[i][2])
    settled: list[Any] = []
    for index in order:
        text = texts[index]
        offset_y = 4.0
        for _ in range(100):
            box = Text.get_window_extent(text, renderer)  # the words, not the leader line
            clash = next((b for b in settled if box.overlaps(b)), None)
            if clash is None:
                break
            offset_y -= (box.y1 - clash.y0) * points_per_pixel + 1.0
            text.set_position((6 * sides[index], offset_y))
        settled.append(Text.get_window_extent(text, renderer))


def save_plots(
    client: MlflowClient | Mapping[str, MlflowClient], frame: pl.DataFrame, folder: str | Path
) -> list[Path]:
    """`PLOT_FILES` for the runs of `frame` into `folder`: ``loss_over_flops.png`` and
    ``loss_over_tokens.png`` (`loss_figure`) and ``val_loss_memory.png`` (`memory_figure`).
    `client` reads every run, or is ``run id -> client`` of each run's store."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if frame.is_empty():
        return []
    curves = load_curves(frame, client_history(client))
    figures = (loss_figure(curves, "flops"), loss_figure(curves, "tokens"), memory_figure(curves))
    return [
        _save_figure(figure, folder / name)
        for figure, name in zip(figures, PLOT_FILES, strict=True)
    ]


def _save_figure(figure: Any, path: Path) -> Path:
    """PNG at 100 dpi, cropped to what is drawn (legends outside the axes included)."""
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path
