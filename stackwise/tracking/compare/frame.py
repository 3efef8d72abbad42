"""The comparison frame: the runs a comparison shows, read from MLflow into one polars row each
(grid coordinates, settings, status, results, ids), over one or several stores."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import polars as pl

from stackwise.tracking.compare.common import (
    HEAD_PARAM,
    INTEGER_COLUMNS,
    RESULT_COLUMNS,
    TUNED_AXES,
    CompareError,
    resolve_metric,
)
from stackwise.tracking.compare.experiments import (
    ExperimentRef,
    current_identity,
    resolve_experiments,
)
from stackwise.tracking.compare.selection import (
    all_in_point_order,
    differing_params,
    point_name,
    search_point_runs,
    select_runs,
)
from stackwise.tracking.logger import (
    TAG_CONFIG_HASH,
    TAG_GRID_PREFIX,
    TAG_PARENT,
    TAG_POINT,
    TAG_SEED,
    TAG_TUNE_PREFIX,
)
from stackwise.tracking.sqlite_runs import SqliteRuns

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run


def _start_time(run: Run) -> datetime | None:
    start = run.info.start_time
    return None if start is None else datetime.fromtimestamp(start / 1000).replace(microsecond=0)


def _tag_names(runs: Sequence[Run], prefix: str) -> list[str]:
    """The names after `prefix` of the runs' tags that start with it, in order of appearance."""
    return list(
        dict.fromkeys(
            key[len(prefix) :] for run in runs for key in run.data.tags if key.startswith(prefix)
        )
    )


def runs_frame(
    client: MlflowClient | SqliteRuns,
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
    found = search_point_runs(client, list(experiment_ids), run_ids)
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
        runs.extend(all_in_point_order(mine, chosen) if all_runs else chosen)
    differing = differing_params(runs) if all_runs else []

    metric_column = resolve_metric(metric)
    extra_metric = None if metric_column in RESULT_COLUMNS else metric_column
    axes = _tag_names(runs, TAG_GRID_PREFIX)
    tuned = _tag_names(runs, TAG_TUNE_PREFIX)
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
            "run": point_name(run),
        }
        for axis in axes:
            row[axis] = tags.get(f"{TAG_GRID_PREFIX}{axis}")
        for axis in tuned:
            row[axis] = tags.get(f"{TAG_TUNE_PREFIX}{axis}")
        if replicated or tuned:
            seed = tags.get(TAG_SEED, params.get("training.seed"))
            row["seed"] = None if seed is None else int(seed)
            row["point"] = tags.get(TAG_POINT, point_name(run))
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
    clients: dict[str, MlflowClient | SqliteRuns] | None = None,
    writable: bool = False,
) -> pl.DataFrame:
    """The runs of the given experiments (files or MLflow experiment names), one row each.

    Which runs: see `stackwise.tracking.compare` (files are resolved with `overrides` and
    `only` as `stackwise run` resolves them; `all_runs` shows every run). Columns:
    ``experiment``, ``run``, one column per grid axis, ``training_architecture``,
    ``objective``, ``size`` (unless an axis already has that name), ``head`` (depth-wise runs
    that record it), with `all_runs` the differing params and ``current``, then ``status``, the
    result columns (`RESULT_COLUMNS`), the `metric` when it is another MLflow metric,
    ``start_time``, ``config_hash``, ``run_id`` and ``parent_run_id``.

    Lines about runs not shown go to `notes` when given. Raises `CompareError` for an
    experiment the store does not have; when `notes` is given and several experiments are
    named, one that has not been run yet is left out with a line in `notes` instead, as long
    as at least one is found. `clients`, when given, receives ``run id -> reader`` (`open_reader`) of its
    store (for plots); `writable` makes each an `MlflowClient` (to log on the runs).
    """
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
        client = open_reader(uri, writable)
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
            experiment_id = str(experiment.experiment_id)
            ids[experiment_id] = ref.name
            if ref.specs is not None:
                identities = [current_identity(spec, fingerprints) for spec in ref.specs]
                current[experiment_id] = list(dict.fromkeys(identities))
            else:
                current[experiment_id] = None
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


def open_reader(uri: str, writable: bool = False) -> MlflowClient | SqliteRuns:
    """What reads store `uri`: its SQLite file directly where that gives MLflow's answers
    (`SqliteRuns`: no MLflow import, about 2 s less to start), else, or when `writable`, MLflow's
    client. Opening a client on a SQLite URI creates the database: call this after
    `_check_store`."""
    reader = None if writable else SqliteRuns.open(uri)
    if reader is not None:
        return reader
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _check_store(uri: str) -> None:
    """Refuse a store that cannot be read, without creating anything."""
    from stackwise.tracking.store import check_tracking_uri, sqlite_path

    problem = check_tracking_uri(uri)
    if problem is not None:
        raise CompareError(problem)
    database = sqlite_path(uri)
    if database is not None and not database.exists():
        raise CompareError(f"no tracking store at {database} (nothing has been run there yet)")


def _get_experiment(client: MlflowClient | SqliteRuns, uri: str, name: str) -> Any:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        hint = f"; experiments in the store: {', '.join(known)}" if known else ""
        raise CompareError(f"no experiment named {name!r} in {uri}{hint}")
    return experiment
