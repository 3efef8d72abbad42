"""Reading the runs of a local MLflow SQLite store directly, without importing MLflow.

`stackwise compare` only reads: experiments by name, the grid-point runs of some experiments
(params, tags, latest metrics) and, for plots, metric histories. Importing MLflow and opening
its SQLAlchemy store takes about 2 s of the command's start before anything is read; the same
rows come out of the database file in milliseconds. `SqliteRuns` answers the four calls
`compare` makes of an `MlflowClient` (`get_experiment_by_name`, `search_experiments`,
`get_metric_history` and, as `point_runs`, the one run search it makes) with the values and
the order MLflow's SQL store gives them.

It is used only where it gives MLflow's answers: a ``sqlite:///`` store whose schema revision
is one this module was checked against (`KNOWN_REVISIONS`, the ``alembic_version`` MLflow
writes) and no MLflow workspace chosen; anything else goes through `MlflowClient`. The file is
opened read-only (``mode=ro``): nothing is created, migrated or locked for writing.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stackwise.tracking.store import sqlite_path

# Schema revisions (``alembic_version.version_num``) whose experiments, runs, tags, params and
# metrics tables this reader was checked against, with MLflow's client on the same store.
KNOWN_REVISIONS = frozenset({"dc11669786a5"})
DEFAULT_WORKSPACE = "default"
BUSY_TIMEOUT_S = 30.0  # a writer holding the database: wait as MLflow's store would


@dataclass(frozen=True)
class StoredExperiment:
    experiment_id: str
    name: str
    lifecycle_stage: str


@dataclass(frozen=True)
class StoredRunInfo:
    run_id: str
    run_name: str | None
    experiment_id: str
    status: str
    start_time: int | None
    end_time: int | None
    lifecycle_stage: str


@dataclass
class StoredRunData:
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StoredRun:
    """A run as `compare` reads it: ``info`` and ``data`` as on MLflow's `Run`."""

    info: StoredRunInfo
    data: StoredRunData


@dataclass(frozen=True)
class StoredMetric:
    key: str
    value: float
    timestamp: int
    step: int


def _value(value: float | None, is_nan: int | bool) -> float:
    return math.nan if is_nan or value is None else float(value)


class SqliteRuns:
    """Read-only answers from a local MLflow SQLite store (see the module docstring)."""

    def __init__(self, connection: sqlite3.Connection, tracking_uri: str) -> None:
        self._db = connection
        self.tracking_uri = tracking_uri  # the store read, as on `MlflowClient`

    @classmethod
    def open(cls, uri: str) -> SqliteRuns | None:
        """A reader of store `uri`, or None where MLflow's own client must answer: not a
        SQLite store, no database yet, an unknown schema revision, or a workspace chosen."""
        path = sqlite_path(uri)
        if path is None or not path.is_file() or os.environ.get("MLFLOW_WORKSPACE"):
            return None
        try:
            connection = sqlite3.connect(
                f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S
            )
        except sqlite3.Error:
            return None
        try:
            revisions = {row[0] for row in connection.execute("SELECT * FROM alembic_version")}
        except sqlite3.Error:
            revisions = set()
        if len(revisions) != 1 or not revisions <= KNOWN_REVISIONS:
            connection.close()
            return None
        return cls(connection, uri)

    def close(self) -> None:
        self._db.close()

    def get_experiment_by_name(self, name: str) -> StoredExperiment | None:
        """The experiment of that name, deleted or not (as MLflow's lookup by name)."""
        row = self._db.execute(
            "SELECT experiment_id, name, lifecycle_stage FROM experiments "
            "WHERE name = ? AND workspace = ?",
            (name, DEFAULT_WORKSPACE),
        ).fetchone()
        return None if row is None else StoredExperiment(str(row[0]), row[1], row[2])

    def search_experiments(self) -> list[StoredExperiment]:
        """The active experiments."""
        rows = self._db.execute(
            "SELECT experiment_id, name, lifecycle_stage FROM experiments "
            "WHERE lifecycle_stage = 'active' AND workspace = ? ORDER BY experiment_id",
            (DEFAULT_WORKSPACE,),
        )
        return [StoredExperiment(str(i), n, s) for i, n, s in rows]

    def point_runs(self, experiment_ids: Sequence[str], role_tag: str) -> list[StoredRun]:
        """The active runs of the experiments whose tag `role_tag` is ``point``, oldest first
        (MLflow's order for ``order_by=["attributes.start_time ASC"]``: runs without a start
        time last, ties by run id)."""
        if not experiment_ids:
            return []
        marks = ",".join("?" * len(experiment_ids))
        rows = self._db.execute(
            "SELECT run_uuid, name, experiment_id, status, start_time, end_time, lifecycle_stage "
            f"FROM runs WHERE experiment_id IN ({marks}) AND lifecycle_stage = 'active' "
            "AND run_uuid IN (SELECT run_uuid FROM tags WHERE key = ? AND value = 'point') "
            "ORDER BY start_time IS NULL, start_time, run_uuid",
            (*(int(i) for i in experiment_ids), role_tag),
        ).fetchall()
        runs = {
            row[0]: StoredRun(
                StoredRunInfo(row[0], row[1], str(row[2]), row[3], row[4], row[5], row[6]),
                StoredRunData(),
            )
            for row in rows
        }
        if not runs:
            return []
        ids = list(runs)
        for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for run_id, key, value in self._db.execute(
                f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({marks})", chunk
            ):
                runs[run_id].data.params[key] = value
            for run_id, key, value in self._db.execute(
                f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({marks})", chunk
            ):
                runs[run_id].data.tags[key] = value
            for run_id, key, value, is_nan in self._db.execute(
                "SELECT run_uuid, key, value, is_nan FROM latest_metrics "
                f"WHERE run_uuid IN ({marks})",
                chunk,
            ):
                runs[run_id].data.metrics[key] = _value(value, is_nan)
        return list(runs.values())

    def get_metric_history(self, run_id: str, key: str) -> list[StoredMetric]:
        """Every value of metric `key` of run `run_id`, in MLflow's order (time, step, value)."""
        rows = self._db.execute(
            "SELECT value, is_nan, timestamp, step FROM metrics WHERE run_uuid = ? AND key = ? "
            "ORDER BY timestamp, step, value",
            (run_id, key),
        )
        return [StoredMetric(key, _value(v, n), int(t), int(s)) for v, n, t, s in rows]
