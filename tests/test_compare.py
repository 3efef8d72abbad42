"""`compare_runs` and `stackwise compare` on the shared tracked store (the `tracked` fixture of
conftest.py, read in test_tracking.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from stackwise.cli import app
from stackwise.tracking.compare import CompareError, compare_runs, parse_pivot, pivot_frame
from stackwise.tracking.store import default_tracking_uri

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
    # A table shows the coordinates that vary and the headline results; --columns all, all.
    header = table.output.splitlines()[1].split()
    assert header == ["mode", "val_loss", "test_loss", "flops", "training_memory_mb", "wall_time_s"]
    every = _compare(tracked, "tracked", "--columns", "all")
    assert "mode=rackwise" in every.output and "tokens_per_s" in every.output

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


def test_compare_subprocess_from_project_folder(
    tracked: dict[str, Any], run_cli: Callable[..., Any]
) -> None:
    """The real console script, default store (./mlruns) found from the working directory."""
    done = run_cli(tracked["cwd"], "compare", "tracked.yaml", "--format", "markdown")
    assert done.returncode == 0, done.stderr
    assert "| mode=stackwise | stackwise |" in done.stdout


def test_compare_never_creates_a_store(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
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


# --------------------------------------------------------------------------------------------
# which runs are shown: hand-written runs in a real SQLite store
# --------------------------------------------------------------------------------------------

LR = "training.optimizer.lr"


@pytest.fixture(scope="module")
def blank_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite store, created once (building MLflow's tables takes seconds)."""
    from stackwise.tracking.store import open_client

    database = tmp_path_factory.mktemp("blank") / "mlflow.db"
    open_client(f"sqlite:///{database}")
    return database


def _hand_store(tmp_path: Path, blank: Path) -> tuple[Any, str]:
    """A fresh copy of the blank store in `tmp_path` and a client on it."""
    import shutil

    from mlflow import MlflowClient

    database = tmp_path / "hand.db"
    if not database.exists():
        shutil.copyfile(blank, database)
    uri = f"sqlite:///{database}"
    return MlflowClient(tracking_uri=uri), uri


def _log_run(
    client: Any,
    experiment_id: str,
    coordinates: dict[str, str],
    config_hash: str,
    start_s: int,
    status: str = "FINISHED",
    params: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
    history: dict[str, list[tuple[int, float]] | list[tuple[int, float, float]]] | None = None,
    mode: str | None = None,
    size: str = "small",
    objective: str = "clm",
) -> str:
    """One grid-point run as `stackwise run` tags it, started at `start_s` seconds. A history
    point is (step, value) or (step, value, seconds after the run's start): when it was logged."""
    from mlflow.entities import Metric, Param

    name = ",".join(f"{k}={v}" for k, v in coordinates.items())
    tags = {
        "stackwise.role": "point",
        "config_hash": config_hash,
        "stackwise.run_name": name,
        "training_architecture": mode or coordinates.get("mode", "rackwise"),
        "objective": coordinates.get("objective", objective),
        "size": coordinates.get("size", size),
        **{f"grid.{k}": v for k, v in coordinates.items()},
    }
    start = (1_700_000_000 + start_s) * 1000
    run = client.create_run(experiment_id, start_time=start, tags=tags, run_name=name)
    run_id = run.info.run_id
    values = [Metric(k, v, 0, 999) for k, v in (metrics or {}).items()]
    for key, points in (history or {}).items():
        for step, value, *seconds in points:
            logged = start + round(seconds[0] * 1000) if seconds else 0
            values.append(Metric(key, value, logged, step))
    param_list = [Param(k, v) for k, v in (params or {}).items()]
    client.log_batch(run_id, metrics=values, params=param_list)
    client.set_terminated(run_id, status=status, end_time=start + 1000)
    return run_id


def _hand_compare(uri: str, *args: str) -> Any:
    return CliRunner().invoke(app, ["compare", *args, "--tracking-uri", uri])


def test_new_and_old_experiments_are_model_training_experiments(
    tmp_path: Path, blank_store: Path
) -> None:
    """The MLflow UI opens an experiment in the view its kind tag names (MLflow 3)."""
    from stackwise.tracking.store import get_or_create_experiment

    client, uri = _hand_store(tmp_path, blank_store)
    created = client.get_experiment(get_or_create_experiment(client, uri, "fresh"))
    assert created.tags["mlflow.experimentKind"] == "custom_model_development"
    old_id = client.create_experiment("old")  # as an earlier StackWise left it: no kind
    assert "mlflow.experimentKind" not in client.get_experiment(old_id).tags
    assert get_or_create_experiment(client, uri, "old") == old_id
    assert client.get_experiment(old_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )


GridFile = Callable[[Path, str], tuple[Path, list[str], list[str]]]


@pytest.fixture
def grid_file(write_experiment: Callable[..., Path]) -> GridFile:
    """`grid_file(folder, uri)`: a two-point file, with the run identities `stackwise run` gives
    its points as written and with lr=0.002."""
    from stackwise.config.experiment import expand_grid, load_experiment
    from stackwise.runner import point_of

    def grid_file(folder: Path, uri: str) -> tuple[Path, list[str], list[str]]:
        grid = {"training.training_architecture": ["rackwise", "stackwise"]}
        path = write_experiment(folder, "hand", grid=grid)
        experiment = load_experiment(path)
        current = [point_of(s, uri).identity for s in expand_grid(experiment)]
        other = [point_of(s, uri).identity for s in expand_grid(experiment, [f"{LR}=0.002"])]
        assert len(set(current + other)) == 4
        return path, current, other

    return grid_file


def test_compare_file_shows_latest_finished_run_of_current_settings(
    tmp_path: Path, blank_store: Path, grid_file: GridFile
) -> None:
    client, uri = _hand_store(tmp_path, blank_store)
    from stackwise.tracking.store import get_or_create_experiment

    path, (rack, stack), (rack_set, stack_set) = grid_file(tmp_path, uri)
    experiment_id = get_or_create_experiment(client, uri, "hand")
    old, new = {LR: "0.001"}, {LR: "0.002"}
    rackwise, stackwise = {"mode": "rackwise"}, {"mode": "stackwise"}
    runs = {
        "rack_failed": _log_run(client, experiment_id, rackwise, rack, 1, "FAILED", old),
        "rack": _log_run(client, experiment_id, rackwise, rack, 2, params=old),
        "stack": _log_run(client, experiment_id, stackwise, stack, 3, params=old),
        "stack_failed_later": _log_run(client, experiment_id, stackwise, stack, 4, "FAILED", old),
        "rack_set": _log_run(client, experiment_id, rackwise, rack_set, 5, params=new),
        "stack_set": _log_run(client, experiment_id, stackwise, stack_set, 6, params=new),
    }

    notes: list[str] = []
    frame = compare_runs([str(path)], tracking_uri=uri, notes=notes)
    assert frame["run_id"].to_list() == [runs["rack"], runs["stack"]]
    assert frame["config_hash"].to_list() == [rack, stack]
    assert notes == [
        "hand: not shown: 2 runs of other settings and 2 other attempts; --all lists every run"
    ]
    # The same file with the --set of the rerun: the rerun's runs.
    rerun = compare_runs([str(path)], tracking_uri=uri, overrides=[f"{LR}=0.002"])
    assert rerun["run_id"].to_list() == [runs["rack_set"], runs["stack_set"]]
    # By experiment name there are no current settings: the latest finished run per point.
    by_name = compare_runs(["hand"], tracking_uri=uri)
    assert by_name["run_id"].to_list() == [runs["rack_set"], runs["stack_set"]]

    every = compare_runs([str(path)], tracking_uri=uri, all_runs=True)
    order = ["rack_failed", "rack", "rack_set", "stack", "stack_failed_later", "stack_set"]
    assert every["run_id"].to_list() == [runs[k] for k in order]
    assert every["current"].to_list() == ["no", "yes", "no", "yes", "no", "no"]
    assert every[LR].to_list() == ["0.001", "0.001", "0.002", "0.001", "0.001", "0.002"]
    assert every["config_hash"].to_list() == [rack, rack, rack_set, stack, stack, stack_set]
    assert every["start_time"].null_count() == 0

    # The CLI: only current runs by default, with a note; --all shows every hash.
    csv = _hand_compare(uri, str(path), "--format", "csv")
    assert csv.exit_code == 0, csv.output
    rows = list(pl.read_csv(csv.stdout.encode()).iter_rows(named=True))
    assert [r["run_id"] for r in rows] == [runs["rack"], runs["stack"]]
    assert "--all lists every run" in csv.stderr
    # The human view of every run keeps what tells runs apart (markdown: the table's columns).
    table = _hand_compare(uri, str(path), "--all", "--format", "markdown")
    assert table.exit_code == 0, table.output
    header, _, *lines = table.stdout.splitlines()
    assert [c.strip() for c in header.strip("|").split("|")][-3:] == [
        "parameters",
        "start_time",
        "config_hash",
    ]
    assert [line.strip("|").split("|")[-1].strip() for line in lines] == [
        rack,
        rack,
        rack_set,
        stack,
        stack,
        stack_set,
    ]
    assert f"| {LR} |" in header
    # --columns with --all keeps what tells two runs of one point apart.
    narrow = _hand_compare(uri, str(path), "--all", "--format", "csv", "--columns", "val_loss")
    assert narrow.exit_code == 0, narrow.output
    picked = pl.read_csv(narrow.stdout.encode())
    assert picked.columns == ["experiment", "run", LR, "current", "val_loss"]
    assert picked.select("run", LR, "current").unique().height == picked.height == 6
    plain = _hand_compare(uri, str(path), "--format", "markdown")
    assert "config_hash" not in plain.stdout and "start_time" not in plain.stdout
    # --set resolves a file; an experiment name has no settings to override.
    by_name_set = _hand_compare(uri, "hand", "--set", f"{LR}=0.002")
    assert by_name_set.exit_code == 2 and "give its file instead" in by_name_set.stderr


def test_compare_file_notes_grid_points_without_a_run(
    tmp_path: Path, blank_store: Path, grid_file: GridFile
) -> None:
    from stackwise.tracking.store import get_or_create_experiment

    client, uri = _hand_store(tmp_path, blank_store)
    path, (rack, _), (rack_set, _) = grid_file(tmp_path, uri)
    experiment_id = get_or_create_experiment(client, uri, "hand")
    _log_run(client, experiment_id, {"mode": "rackwise"}, rack_set, 1)
    notes: list[str] = []
    frame = compare_runs([str(path)], tracking_uri=uri, notes=notes)
    assert frame.height == 0
    assert any("2 grid points of the current settings have no run yet" in n for n in notes)
    assert any("1 run of other settings" in n for n in notes)
    _log_run(client, experiment_id, {"mode": "rackwise"}, rack, 2, "FAILED")
    frame = compare_runs([str(path)], tracking_uri=uri)
    assert frame["status"].to_list() == ["FAILED"]  # no finished run: its latest attempt


# --------------------------------------------------------------------------------------------
# pivots never pick one run of several
# --------------------------------------------------------------------------------------------


def _objectives_store(
    tmp_path: Path, blank_store: Path
) -> tuple[str, dict[tuple[str, str], float]]:
    """Experiment `objectives`: objective x mode at one size, each with a known val loss."""
    from stackwise.tracking.store import get_or_create_experiment

    client, uri = _hand_store(tmp_path, blank_store)
    experiment_id = get_or_create_experiment(client, uri, "objectives")
    losses = {
        ("clm", "rackwise"): 1.5,
        ("clm", "stackwise"): 1.9,
        ("mlm", "rackwise"): 2.5,
        ("mlm", "stackwise"): 2.75,
    }
    for index, ((objective, mode), loss) in enumerate(losses.items()):
        coordinates = {"size": "small", "objective": objective, "mode": mode}
        _log_run(
            client,
            experiment_id,
            coordinates,
            f"hash{index}",
            index,
            params={LR: "0.001"},
            metrics={"final_val_loss": loss},
        )
    return uri, losses


def test_pivot_with_several_runs_in_a_cell_exits_2_naming_what_differs(
    tmp_path: Path, blank_store: Path
) -> None:
    uri, losses = _objectives_store(tmp_path, blank_store)
    crowded = _hand_compare(uri, "objectives", "--pivot", "size x mode")
    assert crowded.exit_code == 2, crowded.output
    assert "2 cells hold several runs" in crowded.stderr
    assert "differ in objective (clm, mlm)" in crowded.stderr
    assert "--agg mean|min|max|last" in crowded.stderr
    assert "Traceback" not in crowded.output and crowded.stdout == ""

    def cells(*agg: str) -> dict[str, float]:
        done = _hand_compare(
            uri, "objectives", "--pivot", "size x mode", "--format", "csv", "--agg", *agg
        )
        assert done.exit_code == 0, done.output
        (row,) = pl.read_csv(done.stdout.encode()).iter_rows(named=True)
        assert row["size"] == "small"
        return {mode: row[mode] for mode in ("rackwise", "stackwise")}

    combined = {agg: cells(agg) for agg in ("mean", "min", "max", "last")}
    for mode in ("rackwise", "stackwise"):
        values = [loss for (_, m), loss in losses.items() if m == mode]
        assert combined["mean"][mode] == pytest.approx(sum(values) / len(values))
        assert combined["min"][mode] == min(values)
        assert combined["max"][mode] == max(values)
        assert combined["last"][mode] == losses[("mlm", mode)]  # the mlm runs started later
    # One run per cell: no aggregation needed.
    plain = _hand_compare(uri, "objectives", "--pivot", "objective x mode", "--format", "csv")
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.splitlines()[1] == "clm,1.5,1.9"

    assert _hand_compare(uri, "objectives", "--agg", "mean").exit_code == 2  # no --pivot
    bad = _hand_compare(uri, "objectives", "--pivot", "size x mode", "--agg", "median")
    assert bad.exit_code == 2 and "--agg" in bad.stderr


def test_pivot_of_every_run_names_the_param_that_differs(tmp_path: Path, blank_store: Path) -> None:
    from stackwise.tracking.store import get_or_create_experiment

    uri, _ = _objectives_store(tmp_path, blank_store)
    client, _ = _hand_store(tmp_path, blank_store)
    experiment_id = get_or_create_experiment(client, uri, "objectives")
    coordinates = {"size": "small", "objective": "clm", "mode": "rackwise"}
    _log_run(client, experiment_id, coordinates, "rerun", 10, params={LR: "0.002"})
    frame = compare_runs(["objectives"], tracking_uri=uri, all_runs=True)
    with pytest.raises(CompareError, match=r"differ in training\.optimizer\.lr \(0\.001, 0\.002\)"):
        pivot_frame(frame, "objective x mode")
    # Two runs of the same settings (a --force rerun) differ in nothing but when they ran.
    _log_run(client, experiment_id, coordinates, "rerun", 11, params={LR: "0.002"})
    frame = compare_runs(["objectives"], tracking_uri=uri, all_runs=True)
    reruns = frame.filter(pl.col("config_hash") != "hash0")
    with pytest.raises(CompareError, match="reruns of the same settings"):
        pivot_frame(reruns, "objective x mode")


# --------------------------------------------------------------------------------------------
# plots: one mark per run, every run present
# --------------------------------------------------------------------------------------------

MIB = 2**20


def _plot_store(tmp_path: Path, blank_store: Path) -> tuple[Any, str, dict[str, str]]:
    """Experiment `plots`: a rackwise and a two-stage stackwise run with per-step series (logged
    at known seconds after training starts) and their training memory, an older run without
    `train/flops`, timestamps or training memory, and a failed run that recorded nothing."""
    from stackwise.tracking.store import get_or_create_experiment

    client, uri = _hand_store(tmp_path, blank_store)
    experiment_id = get_or_create_experiment(client, uri, "plots")
    tokens = [(s, 256.0 * s) for s in (4, 8, 12, 16)]
    runs = {
        "rack": _log_run(
            client,
            experiment_id,
            {"size": "small", "mode": "rackwise"},
            "h1",
            1,
            metrics={
                "final_val_loss": 2.5,
                "flops": 16e9,
                "peak_memory_bytes": 100 * MIB,
                "training_memory_bytes": 40 * MIB,
                "wall_time_s": 81.0,
            },
            history={
                "train/tokens": tokens,
                "train/flops": [(s, 1e9 * s) for s in (4, 8, 12, 16)],
                # training starts 5 s after the run (setup), validations 30 s and 80 s later
                "val/loss": [(6, 3.0, 35.0), (16, 2.5, 85.0)],
                "stage/index": [(0, 0.0, 5.0)],
            },
        ),
        "stack": _log_run(
            client,
            experiment_id,
            {"size": "small", "mode": "stackwise"},
            "h2",
            2,
            params={"training.depthwise.head": "untie"},
            metrics={
                "final_val_loss": 2.75,
                "flops": 12e9,
                "peak_memory_bytes": 60 * MIB,
                "training_memory_bytes": 20 * MIB,
                "wall_time_s": 71.0,
            },
            history={
                "train/tokens": tokens,
                # stage 1: 1e9 FLOPs per step; stage 2 (from step 8): 0.5e9 per step
                "train/flops": [(4, 4e9), (8, 8e9), (12, 10e9), (16, 12e9)],
                "val/loss": [(8, 3.25, 42.0), (10, 3.0, 52.5), (16, 2.75, 72.0)],
                "stage/index": [(0, 0.0, 2.0), (8, 1.0, 42.0)],
            },
        ),
        "old": _log_run(
            client,
            experiment_id,
            {"size": "medium", "mode": "stackwise"},
            "h3",
            3,
            params={"training.depthwise.head": "untie"},
            metrics={
                "final_val_loss": 2.2,
                "flops": 20e9,
                "peak_memory_bytes": 150 * MIB,
                "wall_time_s": 55.0,
            },
            history={"train/tokens": tokens, "val/loss": [(8, 2.6), (16, 2.2)]},
        ),
        "failed": _log_run(
            client, experiment_id, {"size": "medium", "mode": "rackwise"}, "h4", 4, "FAILED"
        ),
    }
    return client, uri, runs


def _lines_by_run(figure: Any, names: list[str]) -> dict[str, Any]:
    (axis,) = figure.axes
    lines = {line.get_label().split(" (")[0]: line for line in axis.lines}
    assert len(axis.lines) == len(names) and set(lines) == set(names)
    return lines


def _panels(figure: Any) -> dict[str, dict[str, Any]]:
    """Panel title's mode -> {run name: its line} of a loss figure with one panel per mode."""
    return {
        axis.get_title().split(" (")[0]: {
            line.get_label().split(" (")[0]: line for line in axis.lines
        }
        for axis in figure.axes
    }


def _legend_outside(figure: Any) -> None:
    figure.canvas.draw()
    (axis,) = figure.axes
    legend = axis.get_legend()
    assert legend.get_window_extent().x0 >= axis.get_window_extent().x1


def _legend_entries(axis: Any) -> list[str]:
    return [text.get_text() for text in axis.get_legend().get_texts()]


def test_loss_plots_draw_one_panel_per_mode(tmp_path: Path, blank_store: Path) -> None:
    from stackwise.tracking.compare import client_history, load_curves, loss_figure

    client, uri, runs = _plot_store(tmp_path, blank_store)
    frame = compare_runs(["plots"], tracking_uri=uri)
    assert len(frame["run"].to_list()) == 4
    name = dict(zip(frame["run_id"].to_list(), frame["run"].to_list(), strict=True))
    names = {key: name[run_id] for key, run_id in runs.items()}
    curves = load_curves(frame, client_history(client))

    figure = loss_figure(curves, "flops")
    panels = _panels(figure)
    assert {mode: set(lines) for mode, lines in panels.items()} == {
        "rackwise": {names["rack"], names["failed"]},
        "stackwise": {names["stack"], names["old"]},
    }
    rackwise, stackwise = figure.axes
    # One y axis and one x range for all panels: the modes compare at a glance.
    assert rackwise.get_shared_y_axes().joined(rackwise, stackwise)
    assert rackwise.get_xlim() == stackwise.get_xlim() and rackwise.get_xscale() == "log"
    stack, rack = panels["stackwise"][names["stack"]], panels["rackwise"][names["rack"]]
    # Val points at the FLOPs executed by then: step 10 lies in stage 2 (0.5e9 per step).
    assert list(stack.get_xdata()) == [8e9, 9e9, 12e9]
    assert list(stack.get_ydata()) == [3.25, 3.0, 2.75]
    assert stack.get_markevery() == [0]  # the stage boundary at step 8
    assert list(rack.get_xdata()) == [6e9, 16e9] and rack.get_marker() in (None, "None", "")
    old = panels["stackwise"][names["old"]]
    assert list(old.get_xdata()) == [20e9] and list(old.get_ydata()) == [2.2]  # final point
    failed = panels["rackwise"][names["failed"]]
    assert len(failed.get_xdata()) == 0 and "no flops / validation loss" in failed.get_label()
    # Within a mode the two sizes take two colours; `head` (untie for both stackwise runs,
    # blank for rackwise) varies in no panel and picks nothing.
    assert frame["head"].to_list() == [None, "untie", "untie", None]
    assert stack.get_color() != old.get_color() and rack.get_color() != failed.get_color()
    # Each panel's legend sits under it and names its lines by the size.
    figure.canvas.draw()
    for axis in figure.axes:
        assert axis.get_legend().get_window_extent().y1 <= axis.get_window_extent().y0
    assert _legend_entries(rackwise) == [
        "size=small",
        "size=medium (no flops / validation loss recorded)",
    ]
    assert _legend_entries(stackwise) == [
        "size=small",
        "size=medium",
        "stage boundary (depth-wise)",
    ]
    assert rackwise.get_legend().get_title().get_text() == "rackwise: colour size"

    panels = _panels(loss_figure(curves, "tokens"))
    assert list(panels["stackwise"][names["stack"]].get_xdata()) == [2048.0, 2560.0, 4096.0]
    assert list(panels["stackwise"][names["old"]].get_xdata()) == [2048.0, 4096.0]


def test_loss_panel_colours_the_coordinate_that_varies_most() -> None:
    """12 blockwise runs (head x init x data) and a rackwise reference: the blockwise panel has
    12 lines, one colour per head (the coordinate with the most values), the same init and data
    the same line style, and no two lines alike."""
    import itertools

    from stackwise.tracking.compare import RunCurve, loss_figure

    def run(mode: str, head: str, init: str, data: str, loss: float) -> RunCurve:
        steps = [10, 20, 30]
        coordinates = {"head": head, "init": init, "data": data}
        return RunCurve(
            label=f"mode={mode}," + ",".join(f"{k}={v}" for k, v in coordinates.items()),
            mode=mode,
            style=", ".join(f"{k}={v}" for k, v in coordinates.items()),
            val=[(s, loss + 10 / s) for s in steps],
            tokens=[(s, 100.0 * s) for s in steps],
            flops=[(s, 1e9 * s) for s in steps],
            coordinates=coordinates,
        )

    settings = list(itertools.product(("untie", "fresh", "frozen"), ("random", "copy"), ("a", "b")))
    curves = [run("blockwise", *s, 2.0 + i / 100) for i, s in enumerate(settings)]
    curves.append(run("rackwise", "untie", "random", "a", 2.5))
    figure = loss_figure(curves, "flops")
    blockwise, rackwise = figure.axes
    assert len(blockwise.lines) == 12 and len(rackwise.lines) == 1
    colour_of = {s: line.get_color() for s, line in zip(settings, blockwise.lines, strict=True)}
    style_of = {s: line.get_linestyle() for s, line in zip(settings, blockwise.lines, strict=True)}
    for head in ("untie", "fresh", "frozen"):
        assert len({c for s, c in colour_of.items() if s[0] == head}) == 1
    assert len(set(colour_of.values())) == 3
    for rest in itertools.product(("random", "copy"), ("a", "b")):
        assert len({st for s, st in style_of.items() if s[1:] == rest}) == 1
    assert len(set(style_of.values())) == 4
    assert len({(colour_of[s], style_of[s]) for s in settings}) == 12
    legend = blockwise.get_legend()
    assert legend.get_title().get_text() == "blockwise: colour head, line style init / data"
    assert _legend_entries(blockwise)[0] == "head=untie, init=random, data=a"
    assert legend.get_lines()[1].get_linestyle() == style_of[("untie", "random", "b")]
    # A rerun with the same coordinates: coordinates cannot tell the lines apart, so each line
    # takes its own colour and its run's name.
    reruns = [
        run("stackwise", "untie", "random", "a", 2.0),
        run("stackwise", "fresh", "random", "a", 2.1),
    ]
    reruns.insert(1, run("stackwise", "untie", "random", "a", 2.2))
    reruns[1].label += " [abc1234]"
    (axis,) = loss_figure(reruns, "flops").axes
    assert len({line.get_color() for line in axis.lines}) == 3
    assert _legend_entries(axis) == [curve.label for curve in reruns]


def test_loss_over_time_uses_the_metric_timestamps(tmp_path: Path, blank_store: Path) -> None:
    from stackwise.tracking.compare import (
        client_history,
        client_timestamps,
        load_curves,
        loss_figure,
    )

    client, uri, runs = _plot_store(tmp_path, blank_store)
    frame = compare_runs(["plots"], tracking_uri=uri)
    name = dict(zip(frame["run_id"].to_list(), frame["run"].to_list(), strict=True))
    curves = load_curves(frame, client_history(client), client_timestamps(client))
    figure = loss_figure(curves, "seconds")
    panels = _panels(figure)
    # Seconds from the training start (the first stage/index) to each val/loss.
    assert list(panels["rackwise"][name[runs["rack"]]].get_xdata()) == [30.0, 80.0]
    stack = panels["stackwise"][name[runs["stack"]]]
    assert list(stack.get_xdata()) == [40.0, 50.5, 70.0]
    assert list(stack.get_ydata()) == [3.25, 3.0, 2.75]
    # No timestamps: the run's final point, at its wall_time_s.
    old = panels["stackwise"][name[runs["old"]]]
    assert list(old.get_xdata()) == [55.0] and list(old.get_ydata()) == [2.2]
    title = figure.get_suptitle()
    assert "wall-clock time" in title and "MLflow timestamps" in title
    assert "1 run without them: final point (wall_time_s)" in title
    assert figure.axes[0].get_xscale() == "linear" and figure.axes[0].get_xlim()[0] == 0


def test_memory_plot_places_runs_at_their_training_memory(
    tmp_path: Path, blank_store: Path
) -> None:
    from stackwise.tracking.compare import client_history, load_curves, memory_figure

    client, uri, runs = _plot_store(tmp_path, blank_store)
    frame = compare_runs(["plots"], tracking_uri=uri)
    name = dict(zip(frame["run_id"].to_list(), frame["run"].to_list(), strict=True))
    curves = load_curves(frame, client_history(client))
    figure = memory_figure(curves)
    lines = _lines_by_run(figure, frame["run"].to_list())
    # rack and stack recorded their training memory (40 and 20 MiB; process peaks 100 and 60);
    # old did not: it stands at its peak memory, hollow.
    expected = {"rack": (40.0, 2.5), "stack": (20.0, 2.75), "old": (150.0, 2.2)}
    for key, point in expected.items():
        line = lines[name[runs[key]]]
        assert (*line.get_xdata(), *line.get_ydata()) == point
    assert lines[name[runs["old"]]].get_markerfacecolor() == "none"
    assert lines[name[runs["rack"]]].get_markerfacecolor() != "none"
    assert len(lines[name[runs["failed"]]].get_xdata()) == 0
    axis = figure.axes[0]
    assert axis.get_xlabel().startswith("training memory (MiB)")
    assert "peak process memory (MiB), for 1 run without a recorded training memory" in (
        axis.get_xlabel()
    )
    assert any("hollow: peak process memory" in e for e in _legend_entries(axis))
    labels = sorted(text.get_text() for text in axis.texts)
    assert labels == sorted(name[runs[key]] for key in expected)
    _legend_outside(figure)
    # Every run with its training memory: the axis is training memory alone.
    recorded = [c for c in curves if c.training_memory_mb is not None]
    axis = memory_figure(recorded).axes[0]
    assert "peak" not in axis.get_xlabel()
    assert not any("peak" in e for e in _legend_entries(axis))


def test_memory_plot_shows_every_run_of_one_size(tmp_path: Path, blank_store: Path) -> None:
    """attention x mode at one size: eight runs, eight labelled points that do not overlap."""
    from stackwise.tracking.compare import client_history, load_curves, memory_figure
    from stackwise.tracking.store import get_or_create_experiment

    client, uri = _hand_store(tmp_path, blank_store)
    experiment_id = get_or_create_experiment(client, uri, "attention")
    index = 0
    for attention in ("mha", "gqa", "mla", "kernel"):
        # Same memory per mode and losses a hair apart: labels would pile up on each other.
        for mode, memory, loss in (("stackwise", 40, 2.5), ("rackwise", 80, 2.0)):
            index += 1
            _log_run(
                client,
                experiment_id,
                {"attention": attention, "mode": mode},
                f"h{index}",
                index,
                metrics={
                    "final_val_loss": loss + index / 1e4,
                    "training_memory_bytes": memory * MIB,
                },
            )
    frame = compare_runs(["attention"], tracking_uri=uri)
    figure = memory_figure(load_curves(frame, client_history(client)))
    lines = _lines_by_run(figure, frame["run"].to_list())
    assert len(lines) == 8
    from matplotlib.text import Text

    assert sorted(line.get_xdata()[0] for line in lines.values()) == [40.0] * 4 + [80.0] * 4
    figure.canvas.draw()
    boxes = [Text.get_window_extent(text) for text in figure.axes[0].texts]  # words only
    assert len(boxes) == 8
    for i, box in enumerate(boxes):
        assert not any(box.overlaps(other) for other in boxes[i + 1 :])


def test_save_plots_writes_every_png(tmp_path: Path, blank_store: Path) -> None:
    from stackwise.tracking.compare import PLOT_FILES, save_plots

    client, uri, _ = _plot_store(tmp_path, blank_store)
    frame = compare_runs(["plots"], tracking_uri=uri)
    written = save_plots(client, frame, tmp_path / "plots")
    assert [p.name for p in written] == list(PLOT_FILES)
    assert "loss_over_time.png" in PLOT_FILES
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same runs give the same files, byte for byte.
    again = save_plots(client, frame, tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]
    done = _hand_compare(uri, "plots", "--plot", str(tmp_path / "cli"), "--format", "csv")
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(PLOT_FILES)
    file_in_the_way = tmp_path / "taken"
    file_in_the_way.write_text("")
    bad = _hand_compare(uri, "plots", "--plot", str(file_in_the_way))
    assert bad.exit_code == 2 and "--plot" in bad.stderr and bad.stdout == ""


# --------------------------------------------------------------------------------------------
# end to end: real runs, a --set rerun, compare and its plots
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_after_a_set_rerun_shows_the_current_runs(
    tmp_path: Path, write_experiment: Callable[..., Path], run_cli: Callable[..., Any]
) -> None:
    from mlflow import MlflowClient

    from stackwise.tracking.compare import PLOT_FILES, client_history, load_curves, loss_figure

    training = {
        "budget": {"steps": 8},
        "batch_size": 4,
        "seq_len": 32,
        "log_every_steps": 2,
        "device": "cpu",
        "eval": {"batches": 1, "every_steps": 3},
    }
    grid = {"training.training_architecture": ["rackwise", "stackwise"]}
    write_experiment(tmp_path, "rerun", grid=grid, training=training)
    first = run_cli(tmp_path, "run", "rerun.yaml")
    assert first.returncode == 0, first.stdout + first.stderr
    rerun_args = ("--set", f"{LR}=0.002", "--only", "mode=stackwise")
    second = run_cli(tmp_path, "run", "rerun.yaml", *rerun_args)
    assert second.returncode == 0, second.stdout + second.stderr

    client = MlflowClient(default_tracking_uri(tmp_path))
    experiment = client.get_experiment_by_name("rerun")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    points = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`stackwise.role` = 'point'",
        order_by=["attributes.start_time ASC"],
    )
    assert [r.data.params[LR] == "0.002" for r in points] == [False, False, True]
    original, rerun = points[:2], points[2]
    assert {r.data.tags["stackwise.run_name"] for r in points} == {
        "mode=rackwise",
        "mode=stackwise",
    }

    uri, file = default_tracking_uri(tmp_path), str(tmp_path / "rerun.yaml")

    def compare_csv(*args: str) -> tuple[list[dict[str, Any]], str]:
        done = _hand_compare(uri, file, "--format", "csv", *args)
        assert done.exit_code == 0, done.output
        return list(pl.read_csv(done.stdout.encode()).iter_rows(named=True)), done.stderr

    rows, notes = compare_csv()
    assert [r["run_id"] for r in rows] == [r.info.run_id for r in original]
    assert "1 run of other settings" in notes
    assert "which the grid does not set" not in notes  # the file's current runs agree
    # By experiment name, the latest run of each point: the learning rates differ, and the grid
    # does not set it (it was --set for one point).
    by_name = _hand_compare(uri, "rerun", "--format", "csv")
    assert by_name.exit_code == 0, by_name.output
    assert (
        f"shown runs differ in {LR}, which the grid does not set "
        "(0.0003 in mode=rackwise; 0.002 in mode=stackwise)" in by_name.stderr
    )
    assert "training.training_architecture" not in by_name.stderr  # the grid sets it
    rows, _ = compare_csv(*rerun_args)
    assert [r["run_id"] for r in rows] == [rerun.info.run_id]
    rows, _ = compare_csv("--all")
    assert sorted(r["config_hash"] for r in rows) == sorted(
        r.data.tags["config_hash"] for r in points
    )

    plots = run_cli(tmp_path, "compare", "rerun.yaml", "--plot", "plots")  # the real command
    assert plots.returncode == 0, plots.stderr
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(PLOT_FILES)
    parent = client.get_run(original[0].data.tags["mlflow.parentRunId"])
    assert set(PLOT_FILES) <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    # The FLOPs view draws every validation point of each run at its executed FLOPs.
    frame = compare_runs(["rerun"], tracking_uri=uri, all_runs=True)
    curves = load_curves(frame, client_history(client))
    figure = loss_figure(curves, "flops")
    assert [axis.get_title() for axis in figure.axes] == ["rackwise (1 run)", "stackwise (2 runs)"]
    lines = {line.get_label(): line for axis in figure.axes for line in axis.lines}
    assert len(lines) == 3
    for run, curve in zip(frame.iter_rows(named=True), curves, strict=True):
        line = lines[curve.label]
        assert "train/flops" in client.get_run(run["run_id"]).data.metrics
        val_steps = client.get_metric_history(run["run_id"], "val/loss")
        assert len(line.get_xdata()) == len(val_steps) > 1
        assert line.get_xdata()[-1] == pytest.approx(run["flops"])


def test_memory_plot_numbers_points_beyond_ten_runs() -> None:
    """Many runs: each point carries a number, and the legend (outside the axes) names it."""
    from stackwise.tracking.compare import RunCurve, memory_figure

    curves = [
        RunCurve(
            label=f"head=h{i % 3},init=i{i % 2},mode={mode}",
            mode=mode,
            style=f"head=h{i % 3}, init=i{i % 2}",
            val=[],
            tokens=[],
            flops=[],
            final_val_loss=2.0 + i / 50,
            peak_memory_mb=100.0 + i,
        )
        for i, mode in enumerate(["blockwise", "stackwise"] * 6)
    ]
    figure = memory_figure(curves)
    (axis,) = figure.axes
    assert len(axis.lines) == 12
    assert [text.get_text() for text in axis.texts] == [str(i) for i in range(1, 13)]
    legend = [text.get_text() for text in axis.get_legend().get_texts()]
    for number, curve in enumerate(curves, start=1):
        assert f"{number}: {curve.label}" in legend
    _legend_outside(figure)


def test_compare_file_with_data_files_matches_from_any_folder(
    tmp_path: Path,
    blank_store: Path,
    monkeypatch: pytest.MonkeyPatch,
    write_experiment: Callable[..., Path],
) -> None:
    """A point's identity includes its data's content, with `data.paths` relative to the file:
    compare finds the run whatever folder it is called from."""
    from stackwise.config.experiment import expand_grid, load_experiment
    from stackwise.runner import point_of
    from stackwise.tracking.store import get_or_create_experiment

    client, uri = _hand_store(tmp_path, blank_store)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.txt").write_text("some words to train on\n" * 200)
    data = {"source": "files", "paths": ["data/corpus.txt"], "max_tokens": 4000}
    path = write_experiment(tmp_path, "files", data=data)
    (spec,) = expand_grid(load_experiment(path))
    identity = point_of(spec, uri).identity
    experiment_id = get_or_create_experiment(client, uri, "files")
    run_id = _log_run(client, experiment_id, {}, identity, 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    frame = compare_runs([str(path)], tracking_uri=uri)
    assert frame["run_id"].to_list() == [run_id]
    # Other data content is another run.
    (tmp_path / "data" / "corpus.txt").write_text("other words entirely\n" * 200)
    notes: list[str] = []
    assert compare_runs([str(path)], tracking_uri=uri, notes=notes).height == 0
    assert any("1 run of other settings" in n for n in notes)


def test_columns_keep_the_run_and_the_order_asked_for() -> None:
    import polars as pl

    from stackwise.tracking.compare import CompareError, select_columns

    frame = pl.DataFrame(
        {
            "experiment": ["e"],
            "run": ["r"],
            "mode": ["blockwise"],
            "val_loss": [2.0],
            "flops": [1.0],
        }
    )
    assert select_columns(frame, "flops, val_loss").columns == [
        "experiment",
        "run",
        "flops",
        "val_loss",
    ]
    pivot = pl.DataFrame({"size": ["small"], "rackwise": [2.0], "blockwise": [2.1]})
    assert select_columns(pivot, "blockwise").columns == ["size", "blockwise"]
    with pytest.raises(CompareError, match=r"--columns: no column 'lr'.*the table has"):
        select_columns(frame, "val_loss,lr")
