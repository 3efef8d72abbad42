"""Reading a local MLflow SQLite store without MLflow (`stackwise.tracking.sqlite_runs`): every
answer `compare` takes from it equals MLflow's own client's on the same store."""

from __future__ import annotations

import math
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType

from stackwise.tracking.compare.frame import runs_frame
from stackwise.tracking.sqlite_runs import SqliteRuns

ROLE = "stackwise.role"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store with what `compare` meets: grid-point runs and a parent, runs started at the same
    millisecond, a deleted run, a deleted experiment, NaN and infinite metrics, a metric logged
    at several steps and twice at one step, params and tags."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    first = client.create_experiment("first")
    second = client.create_experiment("second")
    gone = client.create_experiment("gone")
    parent = client.create_run(first, start_time=1_000, tags={ROLE: "grid"})
    starts = [5_000, 3_000, 3_000, 3_000, 9_000]
    for index, start in enumerate(starts):
        run = client.create_run(
            first if index < 4 else second,
            start_time=start,
            tags={ROLE: "point", "mlflow.parentRunId": parent.info.run_id},
            run_name=f"point {index}",
        )
        run_id = run.info.run_id
        client.log_batch(
            run_id,
            metrics=[
                Metric("final_val_loss", 4.0 - index / 10, 10, 3),
                Metric("val/loss", 5.0, 100, 0),
                Metric("val/loss", 4.5, 200, 1),
                Metric("val/loss", 4.2, 300, 2),
                Metric("val/loss", 4.1, 300, 2),  # twice at one step
                Metric("odd", [math.nan, math.inf, -math.inf, 1.5, 0.0][index], 10, 0),
            ],
            params=[Param("training.optimizer.lr", str(0.001 * (index + 1))), Param("size", "s")],
            tags=[RunTag("grid.mode", ["layerwise", "stackwise", "rackwise", "x", "y"][index])],
        )
        status = "FINISHED" if index != 2 else "FAILED"
        client.set_terminated(run_id, status=status, end_time=start + 100)
    deleted = client.create_run(first, start_time=4_000, tags={ROLE: "point"})
    client.delete_run(deleted.info.run_id)
    client.create_run(gone, start_time=2_000, tags={ROLE: "point"})
    client.delete_experiment(gone)
    return uri


def _mlflow_point_runs(client: MlflowClient, ids: list[str]) -> list:
    return list(
        client.search_runs(
            ids,
            filter_string=f"tags.`{ROLE}` = 'point'",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time ASC"],
        )
    )


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_runs_read_from_the_file_are_mlflows_runs_in_mlflows_order(store: str) -> None:
    client = MlflowClient(tracking_uri=store)
    reader = SqliteRuns.open(store)
    assert reader is not None
    assert reader.tracking_uri == client.tracking_uri == store  # what `generate` opens models from
    experiments = {e.name: e.experiment_id for e in client.search_experiments(ViewType.ALL)}
    for ids in (
        [experiments["first"]],
        [experiments["first"], experiments["second"]],
        [experiments["gone"]],
    ):
        want = _mlflow_point_runs(client, ids)
        got = reader.point_runs(ids, ROLE)
        assert [r.info.run_id for r in got] == [r.info.run_id for r in want]
        for mine, theirs in zip(got, want, strict=True):
            for attribute in (
                "run_name",
                "experiment_id",
                "status",
                "start_time",
                "end_time",
                "lifecycle_stage",
            ):
                assert getattr(mine.info, attribute) == getattr(theirs.info, attribute), attribute
            assert mine.data.params == theirs.data.params
            assert mine.data.tags == theirs.data.tags
            assert mine.data.metrics.keys() == theirs.data.metrics.keys()
            for key, value in theirs.data.metrics.items():
                assert _same(mine.data.metrics[key], value), (key, mine.data.metrics[key], value)
            history = reader.get_metric_history(mine.info.run_id, "val/loss")
            reference = client.get_metric_history(mine.info.run_id, "val/loss")
            assert [(m.step, m.value, m.timestamp) for m in history] == [
                (m.step, m.value, m.timestamp) for m in reference
            ]
    # Same-millisecond starts are ordered by run id, and the deleted run is not among them.
    assert len(reader.point_runs([experiments["first"]], ROLE)) == 4


def test_experiments_by_name_as_mlflow_finds_them(store: str) -> None:
    client = MlflowClient(tracking_uri=store)
    reader = SqliteRuns.open(store)
    assert reader is not None
    for name in ("first", "second", "gone", "missing"):
        want = client.get_experiment_by_name(name)
        got = reader.get_experiment_by_name(name)
        if want is None:
            assert got is None
            continue
        assert got is not None
        assert (got.experiment_id, got.name, got.lifecycle_stage) == (
            want.experiment_id,
            want.name,
            want.lifecycle_stage,
        )
    names = {e.name for e in client.search_experiments()}
    assert names == {"Default", "first", "second"}
    assert {e.name for e in reader.search_experiments()} == names


def test_the_comparison_frame_is_the_same_through_either_reader(store: str) -> None:
    client = MlflowClient(tracking_uri=store)
    reader = SqliteRuns.open(store)
    assert reader is not None
    first = client.get_experiment_by_name("first").experiment_id
    for all_runs in (False, True):
        want = runs_frame(client, {first: "first"}, all_runs=all_runs, metric="odd")
        got = runs_frame(reader, {first: "first"}, all_runs=all_runs, metric="odd")
        assert want.height == 4  # four grid points, one run each (the deleted run is not one)
        assert got.columns == want.columns
        assert got.equals(want, null_equal=True), (got, want)


def test_the_reader_writes_nothing_and_stands_aside_for_unknown_stores(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = Path(store.removeprefix("sqlite:///"))
    before = database.read_bytes()
    reader = SqliteRuns.open(store)
    assert reader is not None
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader._db.execute("DELETE FROM runs")
    reader.point_runs(["1"], ROLE)
    reader.close()
    assert database.read_bytes() == before
    # No database, another schema revision, a workspace chosen, another kind of store: MLflow's.
    assert SqliteRuns.open(f"sqlite:///{tmp_path / 'none.db'}") is None
    assert not (tmp_path / "none.db").exists()
    copy = tmp_path / "other.db"
    copy.write_bytes(before)
    with sqlite3.connect(copy) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    assert SqliteRuns.open(f"sqlite:///{copy}") is None
    monkeypatch.setenv("MLFLOW_WORKSPACE", "team")
    assert SqliteRuns.open(store) is None
    monkeypatch.delenv("MLFLOW_WORKSPACE")
    assert SqliteRuns.open(f"file://{tmp_path}") is None
    assert SqliteRuns.open("http://127.0.0.1:5000") is None


def test_a_store_that_cannot_be_read_is_a_clear_error_either_way(
    store: str, tmp_path: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """A store whose tables cannot be read as asked: `tracking store: …`, exit 2, no traceback,
    through the direct reader (SQLite's error) and through MLflow's client (MLflow's error)."""
    broken = tmp_path / "mlflow.db"
    broken.write_bytes(Path(store.removeprefix("sqlite:///")).read_bytes())

    def compare_after(statement: str) -> str:
        with sqlite3.connect(broken) as connection:
            connection.execute(statement)
        result = run_cli(tmp_path, "compare", "first", "--tracking-uri", f"sqlite:///{broken}")
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        return result.stderr

    assert "tracking store: no such table: tags" in compare_after("DROP TABLE tags")
    # An unknown schema revision: MLflow's client reads it, and its refusal is reported too.
    unknown = compare_after("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    assert "tracking store:" in unknown
