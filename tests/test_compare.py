"""`compare_runs` and `stackwise compare` on the shared tracked store (see test_tracking.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from test_tracking import run_cli, shared_tracked_store
from typer.testing import CliRunner

from stackwise.cli import app
from stackwise.tracking.compare import CompareError, compare_runs, parse_pivot, pivot_frame


@pytest.fixture(scope="session")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return shared_tracked_store(tmp_path_factory)


RESULT_COLUMNS = [
    "val_loss",
    "perplexity",
    "tokens_per_s",
    "peak_memory_mb",
    "wall_time_s",
    "parameters",
    "flops",
]


def _compare(tracked: dict[str, Any], *args: str) -> Any:
    result = CliRunner().invoke(app, ["compare", *args, "--tracking-uri", tracked["uri"]])
    return result


def test_compare_runs_frame(tracked: dict[str, Any]) -> None:
    frame = compare_runs(["tracked"], tracking_uri=tracked["uri"])
    assert frame.height == 2
    assert frame["mode"].to_list() == ["rackwise", "stackwise"]  # grid order
    assert frame["status"].to_list() == ["FINISHED", "FINISHED"]
    assert set(RESULT_COLUMNS) <= set(frame.columns)
    for column in RESULT_COLUMNS:
        assert frame[column].null_count() == 0, column
    client = tracked["client"]
    for row in frame.iter_rows(named=True):
        metrics = client.get_run(row["run_id"]).data.metrics
        assert row["val_loss"] == metrics["final_val_loss"]
        assert row["peak_memory_mb"] == pytest.approx(metrics["peak_memory_bytes"] / 2**20)
    # The experiment file names the same experiment and store.
    by_file = compare_runs([str(tracked["file"])], tracking_uri=tracked["uri"])
    assert by_file.equals(frame)


def test_compare_extra_metric_and_pivot(tracked: dict[str, Any]) -> None:
    frame = compare_runs(["tracked"], tracking_uri=tracked["uri"], metric="val/loss")
    assert "val/loss" not in frame.columns  # an alias of val_loss
    frame = compare_runs(["tracked"], tracking_uri=tracked["uri"], metric="train/lr")
    assert frame["train/lr"].null_count() == 0
    pivot = pivot_frame(frame, "size x mode", "val_loss")
    assert pivot.columns == ["size", "rackwise", "stackwise"]
    assert pivot.height == 1
    assert pivot["rackwise"][0] == frame.filter(pl.col("mode") == "rackwise")["val_loss"][0]
    with pytest.raises(CompareError, match="unknown column 'depth'"):
        pivot_frame(frame, "depth x mode")


def test_parse_pivot() -> None:
    assert parse_pivot("size x mode") == ("size", "mode")
    assert parse_pivot("size,mode") == ("size", "mode")
    assert parse_pivot("size×mode") == ("size", "mode")
    with pytest.raises(CompareError):
        parse_pivot("size")


def test_compare_unknown_experiment(tracked: dict[str, Any]) -> None:
    with pytest.raises(CompareError, match=r"no experiment named 'nope'.*tracked"):
        compare_runs(["nope"], tracking_uri=tracked["uri"])
    result = _compare(tracked, "nope")
    assert result.exit_code == 2
    assert "no experiment named 'nope'" in result.output


def test_compare_formats(tracked: dict[str, Any], tmp_path: Path) -> None:
    table = _compare(tracked, "tracked")
    assert table.exit_code == 0, table.output
    assert "mode=rackwise" in table.output and "val_loss" in table.output

    csv = _compare(tracked, "tracked", "--format", "csv")
    assert csv.exit_code == 0, csv.output
    lines = csv.output.strip().splitlines()
    assert lines[0].startswith("experiment,run,mode,")
    assert len(lines) == 3

    markdown = _compare(tracked, "tracked", "--format", "markdown")
    assert markdown.output.startswith("| run | mode |")
    assert markdown.output.count("\n") == 4

    rows = json.loads(_compare(tracked, "tracked", "--format", "json").output)
    assert [r["mode"] for r in rows] == ["rackwise", "stackwise"]

    missing = _compare(tracked, "tracked", "--format", "parquet")
    assert missing.exit_code == 2 and "--output" in missing.output
    target = tmp_path / "runs.parquet"
    written = _compare(tracked, "tracked", "--format", "parquet", "--output", str(target))
    assert written.exit_code == 0, written.output
    assert pl.read_parquet(target).height == 2

    pivot = _compare(
        tracked, "tracked", "--format", "csv", "--pivot", "size,mode", "--metric", "tokens_per_s"
    )
    header, row = pivot.output.strip().splitlines()
    assert header == "size,rackwise,stackwise"
    assert row.startswith("d32x2,")

    bad = _compare(tracked, "tracked", "--format", "xml")
    assert bad.exit_code == 2


def test_compare_subprocess_from_project_folder(tracked: dict[str, Any]) -> None:
    """The real console script, default store (./mlruns) found from the working directory."""
    done = run_cli(tracked["cwd"], "compare", "tracked.yaml", "--format", "markdown")
    assert done.returncode == 0, done.stderr
    assert "| mode=stackwise | stackwise |" in done.stdout


def test_compare_never_creates_a_store(tmp_path: Path) -> None:
    """Comparing in a folder where nothing has run is an error, and leaves the folder empty."""
    for args in (["quickstart"], ["quickstart", "--tracking-uri", "sqlite:///other.db"]):
        done = run_cli(tmp_path, "compare", *args)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "no tracking store at" in done.stderr and "Traceback" not in done.stderr
        assert list(tmp_path.iterdir()) == []


def test_compare_user_errors_exit_2(tracked: dict[str, Any], tmp_path: Path) -> None:
    unknown = _compare(tracked, "tracked", "--metric", "nosuch")
    assert unknown.exit_code == 2
    assert "--metric nosuch: no run has a metric of that name" in unknown.output
    pivot = _compare(tracked, "tracked", "--pivot", "size x mode", "--metric", "nosuch")
    assert pivot.exit_code == 2 and "no run has a metric" in pivot.output
    for fmt, target in (("parquet", tmp_path / "missing" / "runs.parquet"), ("csv", tmp_path)):
        done = _compare(tracked, "tracked", "--format", fmt, "--output", str(target))
        assert done.exit_code == 2, done.output
        assert f"--output {target}: " in done.output
        assert not isinstance(done.exception, OSError)
    server = CliRunner().invoke(
        app, ["compare", "tracked", "--tracking-uri", f"http://127.0.0.1:{_free_port()}"]
    )
    assert server.exit_code == 2 and "cannot reach the MLflow tracking server" in server.output


def test_compare_several_experiments_leaves_out_those_not_run(tracked: dict[str, Any]) -> None:
    frame_notes: list[str] = []
    frame = compare_runs(["tracked", "never_run"], tracking_uri=tracked["uri"], notes=frame_notes)
    assert frame.height == 2
    assert len(frame_notes) == 1 and "no experiment named 'never_run'" in frame_notes[0]
    done = _compare(tracked, "tracked", "never_run", "--format", "csv")
    assert done.exit_code == 0, done.output
    assert "note: left out: no experiment named 'never_run'" in done.output
    # Without any experiment that exists it is still an error.
    assert _compare(tracked, "never_run", "other").exit_code == 2


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
