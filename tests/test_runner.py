"""Grid runs through the real CLI: skip, resume after SIGKILL, failures, concurrent writers."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stackwise.config.experiment import expand_grid, load_experiment
from stackwise.tracking.compare import compare_runs
from stackwise.tracking.store import checkpoint_dir, default_tracking_uri
from stackwise.training.checkpoint import read_checkpoint_metadata

PointRuns = Callable[[Any, str], list[Any]]
Helper = Callable[..., Any]


def _client(cwd: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=default_tracking_uri(cwd))


def _identity(cwd: Path, spec: Any) -> str:
    """The run identity (``config_hash`` tag) a grid point gets in the store of `cwd`."""
    from stackwise.runner import point_of

    return point_of(spec, default_tracking_uri(cwd)).identity


def _experiment_id(cwd: Path, name: str) -> str:
    experiment = _client(cwd).get_experiment_by_name(name)
    assert experiment is not None
    return str(experiment.experiment_id)


FinishedOnce = Callable[[Path, str, list[str]], dict[str, Any]]


@pytest.fixture
def finished_once(point_runs: PointRuns) -> FinishedOnce:
    """`finished_once(cwd, name, hashes)`: every config hash has exactly one FINISHED run in the
    store of `cwd`; returns hash -> that run."""

    def finished_once(cwd: Path, name: str, hashes: list[str]) -> dict[str, Any]:
        runs = point_runs(_client(cwd), _experiment_id(cwd, name))
        chosen = {}
        for config_hash in hashes:
            finished = [
                r
                for r in runs
                if r.data.tags["config_hash"] == config_hash and r.info.status == "FINISHED"
            ]
            statuses = [(r.info.run_id, r.info.status) for r in runs]
            assert len(finished) == 1, (config_hash, statuses)
            chosen[config_hash] = finished[0]
        return chosen

    return finished_once


def test_second_run_skips_every_point(
    tracked: dict[str, Any], point_runs: PointRuns, run_cli: Helper
) -> None:
    """Running the shared store's file again trains nothing and adds no run, not even an
    empty parent run; it prints the comparison of the runs it found."""
    client, experiment_id = tracked["client"], tracked["experiment_id"]
    before = {r.info.run_id for r in client.search_runs([experiment_id])}
    again = run_cli(tracked["cwd"], "run", str(tracked["file"]))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 finished, 2 skipped, 0 failed" in again.stdout
    assert again.stdout.count("↷") == 2  # one skip line per point
    assert "nothing to train" in again.stdout and "val_loss" in again.stdout
    assert {r.info.run_id for r in client.search_runs([experiment_id])} == before


@pytest.mark.slow
def test_force_reruns_and_compare_shows_latest(
    tmp_path: Path, write_experiment: Helper, run_cli: Helper, point_runs: PointRuns
) -> None:
    path = write_experiment(
        tmp_path, "forced", grid={"training.training_architecture": ["rackwise"]}
    )
    first = run_cli(tmp_path, "run", str(path), "--quiet")
    assert first.returncode == 0, first.stdout + first.stderr
    forced = run_cli(tmp_path, "run", str(path), "--force", "--quiet")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    runs = point_runs(_client(tmp_path), _experiment_id(tmp_path, "forced"))
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    # compare shows the grid point once: its latest finished run
    frame = compare_runs(["forced"], tracking_uri=default_tracking_uri(tmp_path))
    latest = max(runs, key=lambda r: r.info.start_time).info.run_id
    assert frame.height == 1 and frame["run_id"][0] == latest


def test_sigkill_mid_grid_then_resume_into_same_run(
    tmp_path: Path,
    write_experiment: Helper,
    tiny_training: Helper,
    cli_command: Helper,
    cli_env: Helper,
    run_cli: Helper,
    point_runs: PointRuns,
    finished_once: FinishedOnce,
    assert_each_step_logged_once: Helper,
) -> None:
    path = write_experiment(
        tmp_path,
        "resume",
        grid={"training.budget.steps": [8, 96]},
        training=tiny_training(8),
    )
    specs = expand_grid(load_experiment(path))
    short, long = specs
    short_id, long_id = _identity(tmp_path, short), _identity(tmp_path, long)
    folder = checkpoint_dir(default_tracking_uri(tmp_path), "resume", long_id)

    process = subprocess.Popen(
        cli_command("run", str(path), "--quiet"),
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metadata = None
    deadline = time.monotonic() + 240
    try:
        while metadata is None and time.monotonic() < deadline and process.poll() is None:
            metadata = read_checkpoint_metadata(folder)
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        output = process.communicate()[0]
    assert metadata is not None, f"no checkpoint of the long run appeared:\n{output}"
    interrupted_run = metadata["mlflow_run_id"]
    client = _client(tmp_path)
    assert client.get_run(interrupted_run).info.status == "RUNNING"
    steps_before = {m.step for m in client.get_metric_history(interrupted_run, "train/loss")}
    assert steps_before and max(steps_before) < 96

    second = run_cli(tmp_path, "run", str(path))
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming (run {interrupted_run})" in second.stdout
    assert "1 finished, 1 skipped, 0 failed" in second.stdout
    runs = finished_once(tmp_path, "resume", [short_id, long_id])
    assert runs[long_id].info.run_id == interrupted_run
    # No duplicate run was opened for the interrupted point, and its curve is complete.
    all_runs = point_runs(client, _experiment_id(tmp_path, "resume"))
    assert sum(r.data.tags["config_hash"] == long_id for r in all_runs) == 1
    steps = sorted(m.step for m in client.get_metric_history(interrupted_run, "train/loss"))
    assert steps == list(range(4, 97, 4))
    assert_each_step_logged_once(client, interrupted_run)
    assert not folder.exists()  # checkpoints of a finished point are removed
    # The killed parent run was recognised as dead and marked KILLED.
    parents = client.search_runs(
        [_experiment_id(tmp_path, "resume")], filter_string="tags.`stackwise.role` = 'grid'"
    )
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]


@pytest.mark.slow  # two CLI processes, ~20 s on 2 cores
def test_ctrl_c_marks_runs_killed_and_a_rerun_resumes(
    tmp_path: Path,
    write_experiment: Helper,
    tiny_training: Helper,
    cli_command: Helper,
    cli_env: Helper,
    run_cli: Helper,
    finished_once: FinishedOnce,
    assert_each_step_logged_once: Helper,
) -> None:
    """SIGINT (Ctrl-C) mid-run: a checkpoint, KILLED runs, exit 130 with a hint, no traceback;
    the same command then resumes into the same run."""
    path = write_experiment(tmp_path, "interrupted", training=tiny_training(24))
    (spec,) = expand_grid(load_experiment(path))
    identity = _identity(tmp_path, spec)
    folder = checkpoint_dir(default_tracking_uri(tmp_path), "interrupted", identity)
    process = subprocess.Popen(
        cli_command("run", str(path)),
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's Ctrl-C reaches a foreground command with SIGINT handled by default, even
        # when this test process runs in the background with SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    try:
        while read_checkpoint_metadata(folder) is None and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert "run the same command again to resume" in stderr
    metadata = read_checkpoint_metadata(folder)
    assert metadata is not None
    run_id = metadata["mlflow_run_id"]
    client = _client(tmp_path)
    assert client.get_run(run_id).info.status == "KILLED"
    parents = client.search_runs(
        [_experiment_id(tmp_path, "interrupted")], filter_string="tags.`stackwise.role` = 'grid'"
    )
    assert [p.info.status for p in parents] == ["KILLED"]

    again = run_cli(tmp_path, "run", str(path), "--quiet")
    assert again.returncode == 0, again.stdout + again.stderr
    assert finished_once(tmp_path, "interrupted", [identity])[identity].info.run_id == run_id
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(4, 25, 4))
    assert_each_step_logged_once(client, run_id)


def test_failing_point_does_not_stop_the_grid(
    tmp_path: Path, write_experiment: Helper, run_cli: Helper, point_runs: PointRuns
) -> None:
    good = tmp_path / "good.txt"
    good.write_text("The quick brown fox jumps over the lazy dog.\n" * 400, encoding="utf-8")
    # Enough bytes for the split, which passes the pre-run checks, but a BPE packs 200 equal
    # bytes into a handful of tokens: too few once tokenized, found by the run.
    repeated = tmp_path / "repeated.txt"
    repeated.write_text("a" * 200, encoding="utf-8")
    path = write_experiment(
        tmp_path,
        "failing",
        data={"source": "files", "max_tokens": 20000, "tokenizer": "bpe", "bpe_vocab_size": 300},
        presets={
            "corpus": {
                "repeated": {"data.paths": [str(repeated)]},
                "good": {"data.paths": [str(good)]},
            }
        },
        grid={"corpus": ["repeated", "good"]},
    )
    done = run_cli(tmp_path, "run", str(path), "--quiet")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 finished, 0 skipped, 1 failed" in done.stdout
    assert "FAILED" in done.stdout and "too few" in done.stdout
    client = _client(tmp_path)
    runs = {
        r.data.tags["stackwise.run_name"]: r
        for r in point_runs(client, _experiment_id(tmp_path, "failing"))
    }
    assert runs["corpus=good"].info.status == "FINISHED"
    failed = runs["corpus=repeated"]
    assert failed.info.status == "FAILED"
    assert "too few" in failed.data.tags["error"]
    trace = Path(client.download_artifacts(failed.info.run_id, "error.txt")).read_text()
    assert "Traceback" in trace and "ValueError" in trace
    parent = client.get_run(failed.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"


@pytest.mark.slow
def test_two_concurrent_runs_lose_nothing(
    tmp_path: Path,
    write_experiment: Helper,
    cli_command: Helper,
    cli_env: Helper,
    finished_once: FinishedOnce,
) -> None:
    grid = {"training.training_architecture": ["rackwise", "stackwise"]}
    first = write_experiment(tmp_path, "alpha", grid=grid)
    second = write_experiment(tmp_path, "beta", grid=grid)
    # Opposite order: both processes write to the fresh store at the same time, and each
    # reaches points the other is training (or has trained).
    processes = [
        subprocess.Popen(
            cli_command("run", *files, "--quiet"),
            cwd=tmp_path,
            env=cli_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for files in ((str(first), str(second)), (str(second), str(first)))
    ]
    outputs = [p.communicate(timeout=400)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
        assert "database is locked" not in output
    client = _client(tmp_path)
    for path, name in ((first, "alpha"), (second, "beta")):
        hashes = [_identity(tmp_path, spec) for spec in expand_grid(load_experiment(path))]
        runs = finished_once(tmp_path, name, hashes)
        for run in runs.values():
            steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
            assert steps == {4, 8, 12, 16}
            assert "final_val_loss" in run.data.metrics
        parents = client.search_runs(
            [_experiment_id(tmp_path, name)], filter_string="tags.`stackwise.role` = 'grid'"
        )
        # One parent per process that trained a point of it; a process that came to a grid
        # the other had finished adds no empty parent run.
        assert 1 <= len(parents) <= 2 and {p.info.status for p in parents} == {"FINISHED"}
        under = {r.data.tags["mlflow.parentRunId"] for r in runs.values()}
        assert under == {p.info.run_id for p in parents}


def test_validation_errors_write_nothing(
    tmp_path: Path, write_experiment: Helper, run_cli: Helper
) -> None:
    path = write_experiment(tmp_path, "broken", training={"budget": {"steps": 0}})
    done = run_cli(tmp_path, "run", str(path), "--quiet")
    assert done.returncode == 2
    assert not (tmp_path / "mlruns").exists()


def test_run_experiments_in_process_sets_threads(
    tmp_path: Path, write_experiment: Helper, finished_once: FinishedOnce
) -> None:
    """The library entry point (no CLI): trains the grid, records it, honours `threads`."""
    import torch

    from stackwise.runner import RunOptions, run_experiments

    path = write_experiment(tmp_path, "inprocess")
    experiment = load_experiment(path)
    specs = expand_grid(experiment)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = run_experiments(
            [(experiment, specs)],
            RunOptions(tracking_uri=default_tracking_uri(tmp_path), quiet=True, threads=1),
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert summary.exit_code == 0
    assert [outcome[1] for outcome in summary.finished] == ["default"]
    finished_once(tmp_path, "inprocess", [_identity(tmp_path, specs[0])])
