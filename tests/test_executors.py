"""Grid points elsewhere: --jobs (subprocesses), Ray tasks, torchrun (DDP over gloo).

The engine tests are `distributed` (and `slow`): `nox -s distributed` runs them with Ray
installed; there, a missing Ray is a failure, not a skip (STACKWISE_REQUIRE_RAY=1).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stackwise.config.experiment import expand_grid, load_experiment
from stackwise.executors.local import job_slots
from stackwise.tracking.store import default_tracking_uri

PointRuns = Callable[[Any, str], list[Any]]
Helper = Callable[..., Any]

# --------------------------------------------------------------------------------------------
# without engines
# --------------------------------------------------------------------------------------------


def test_job_slots_split_the_cores_and_hand_out_gpus() -> None:
    # 2 cores, 2 jobs, no GPU: one thread each (no oversubscription).
    assert [(s.threads, s.gpu) for s in job_slots(2, 2, [])] == [(1, None), (1, None)]
    # 8 cores, 3 jobs, 2 GPUs: 8 // 3 = 2 threads each, GPUs round robin.
    slots = job_slots(3, 8, ["0", "1"])
    assert [(s.threads, s.gpu) for s in slots] == [(2, "0"), (2, "1"), (2, "0")]
    assert slots[1].environment() == {
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "CUDA_VISIBLE_DEVICES": "1",
    }
    # More jobs than cores still gives every job a thread; --threads is taken as given.
    assert {s.threads for s in job_slots(4, 2, [])} == {1}
    assert {s.threads for s in job_slots(2, 16, [], threads=3)} == {3}


@pytest.fixture
def choice_plans(write_experiment: Helper, tiny_training: Helper) -> Helper:
    """`choice_plans(folder, batch_size=4)`: the plans of a one-point experiment file."""

    def choice_plans(folder: Path, batch_size: int = 4) -> list[tuple[Any, list[Any]]]:
        training = {**tiny_training(4), "batch_size": batch_size}
        experiment = load_experiment(write_experiment(folder, "choice", training=training))
        return [(experiment, expand_grid(experiment))]

    return choice_plans


@pytest.fixture
def not_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("not_under_torchrun")
def test_the_flags_choose_the_executor(tmp_path: Path, choice_plans: Helper) -> None:
    from stackwise.executors.choice import choose_executor
    from stackwise.executors.local import JobsExecutor
    from stackwise.executors.torchrun import TorchrunExecutor

    plans = choice_plans(tmp_path)
    assert choose_executor(plans) is None  # here, one point after another
    jobs = choose_executor(plans, jobs=3)
    assert isinstance(jobs, JobsExecutor) and jobs.jobs == 3
    ranks = choose_executor(plans, nproc=2)
    assert isinstance(ranks, TorchrunExecutor) and ranks.nproc == 2


@pytest.mark.usefixtures("not_under_torchrun")
def test_flags_that_do_not_go_together_are_all_reported(
    tmp_path: Path, choice_plans: Helper
) -> None:
    from stackwise.config.errors import ConfigError
    from stackwise.executors.choice import choose_executor

    with pytest.raises(ConfigError) as caught:
        choose_executor([], "dask", address="auto", cpus_per_run=2.0, nproc=2, jobs=2)
    assert [e.field for e in caught.value.errors] == [
        "--executor",
        "--address",
        "--cpus-per-run",
        "--nproc",
    ]
    with pytest.raises(ConfigError, match="the Ray cluster decides") as caught:
        choose_executor([], "ray", jobs=2)
    # a batch of 6 does not split over 4 processes: named at the file's line of the setting
    plans = choice_plans(tmp_path, batch_size=6)
    with pytest.raises(ConfigError, match="6 does not divide by the 4 processes") as caught:
        choose_executor(plans, nproc=4)
    (error,) = caught.value.errors
    assert (error.file, error.field) == (str(plans[0][0].file), "training.batch_size")
    assert choose_executor(plans, nproc=2) is not None  # 6 = 2 x 3


def test_under_torchrun_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from stackwise.executors.choice import under_torchrun

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert under_torchrun()
    monkeypatch.setenv("WORLD_SIZE", "1")  # a launch of one process is not several
    assert not under_torchrun()
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not under_torchrun()


def test_points_options_and_outcomes_travel_as_json(tmp_path: Path, choice_plans: Helper) -> None:
    import json

    from stackwise.executors import messages
    from stackwise.runner import PointOutcome, RunOptions

    ((_, specs),) = choice_plans(tmp_path)
    spec = specs[0]
    travelled = messages.spec_from_json(json.loads(json.dumps(messages.spec_to_json(spec))))
    assert travelled == spec
    options = RunOptions(tracking_uri="ignored", force=True, quiet=True, threads=3)
    back = messages.options_from_json(json.loads(json.dumps(messages.options_to_json(options))))
    # what a point needs; where the driver records (the context) travels separately
    assert (back.force, back.quiet, back.threads, back.tracking_uri) == (True, True, 3, None)
    outcome = PointOutcome("failed", "ValueError: x", "run-1")
    written = tmp_path / "result.json"
    messages.write_outcome(written, messages.outcome_to_json(outcome))
    assert messages.outcome_from_json(messages.read_task(written)) == outcome
    assert not written.with_suffix(".tmp").exists()


def test_executor_flag_mistakes_are_one_line_errors(
    tmp_path: Path, write_experiment: Helper, tiny_training: Helper, run_cli: Helper
) -> None:
    path = write_experiment(tmp_path, "flags", training=tiny_training(4))
    cases = [
        (["--address", "auto"], "--address: only goes with --executor ray"),
        (["--executor", "dask"], "'dask' is not an executor"),
        (["--nproc", "2", "--jobs", "2"], "--nproc: runs one point at a time"),
        # batch_size 4 does not split over 3 processes: the file and the field are named.
        (["--nproc", "3"], "training.batch_size: run default: 4 does not divide by the 3"),
    ]
    for flags, expected in cases:
        result = run_cli(tmp_path, "run", str(path), *flags)
        assert result.returncode == 2, (flags, result.stdout, result.stderr)
        assert expected in result.stderr, (flags, result.stderr)
        assert "Traceback" not in result.stderr
    assert "flags.yaml" in run_cli(tmp_path, "run", str(path), "--nproc", "3").stderr
    assert not (tmp_path / "mlruns").exists()  # nothing written


def test_ray_executor_without_ray_names_the_extra(
    tmp_path: Path, write_experiment: Helper, tiny_training: Helper, cli_env: Helper
) -> None:
    import subprocess

    path = write_experiment(tmp_path, "noray", training=tiny_training(4))
    # The CLI in a process where `import ray` fails, as it does where Ray is not installed.
    code = (
        "import sys; sys.modules['ray'] = None; from stackwise.cli import main; "
        f"sys.argv = ['stackwise', 'run', {str(path)!r}, '--executor', 'ray']; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'stackwise[ray]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlruns").exists()


# --------------------------------------------------------------------------------------------
# --jobs
# --------------------------------------------------------------------------------------------


@pytest.fixture
def finished_by_name(point_runs: PointRuns) -> Helper:
    """`finished_by_name(cwd, name)`: run name -> the point runs of that name of experiment
    `name` in the store of `cwd`."""
    from mlflow import MlflowClient

    def finished_by_name(cwd: Path, name: str) -> dict[str, list[Any]]:
        client = MlflowClient(tracking_uri=default_tracking_uri(cwd))
        experiment = client.get_experiment_by_name(name)
        assert experiment is not None
        runs: dict[str, list[Any]] = {}
        for run in point_runs(client, experiment.experiment_id):
            runs.setdefault(run.info.run_name, []).append(run)
        return runs

    return finished_by_name


@pytest.mark.slow
@pytest.mark.distributed
def test_jobs_two_finishes_a_four_point_grid_once_each(
    tmp_path: Path,
    write_experiment: Helper,
    tiny_training: Helper,
    run_cli: Helper,
    finished_by_name: Helper,
) -> None:
    grid = {"training.training_architecture": ["rackwise", "stackwise"], "training.seed": [1, 2]}
    path = write_experiment(tmp_path, "jobs", grid=grid, training=tiny_training(8))
    started = time.monotonic()
    result = run_cli(tmp_path, "run", str(path), "--jobs", "2")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 finished, 0 skipped, 0 failed" in result.stdout
    assert "[4/4 done, 0 running, 0 failed]" in result.stdout
    # On this machine's cores each of the two jobs got its share, never more.
    cores = len(os.sched_getaffinity(0))
    assert f"({max(1, cores // 2)} thread" in result.stdout
    runs = finished_by_name(tmp_path, "jobs")
    expected = {f"mode={m},seed={s}" for m in ("rackwise", "stackwise") for s in (1, 2)}
    assert set(runs) == expected
    for name, found in runs.items():
        assert [r.info.status for r in found] == ["FINISHED"], name
    hashes = {r.data.tags["config_hash"] for found in runs.values() for r in found}
    assert len(hashes) == 4
    again = run_cli(tmp_path, "run", str(path), "--jobs", "2")
    assert "0 finished, 4 skipped, 0 failed" in again.stdout, again.stdout + again.stderr
    assert {n: len(f) for n, f in finished_by_name(tmp_path, "jobs").items()} == dict.fromkeys(
        expected, 1
    )
    print(f"--jobs 2, 4 points: {elapsed:.1f} s")


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    if os.environ.get("STACKWISE_REQUIRE_RAY") == "1":
        import ray
    else:
        ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _plans(path: Path) -> list[Any]:
    experiment = load_experiment(path)
    return [(experiment, expand_grid(experiment))]


def _run(path: Path, store: Path, executor: Any = None) -> Any:
    from rich.console import Console

    from stackwise.runner import RunOptions, run_experiments

    options = RunOptions(tracking_uri=str(store), quiet=True, executor=executor)
    return run_experiments(_plans(path), options, console=Console(width=200, quiet=True))


@pytest.fixture
def store_points(point_runs: PointRuns) -> Helper:
    """`store_points(store, name)`: the point runs of experiment `name` in the store folder
    `store` (``store/mlflow.db``)."""
    from mlflow import MlflowClient

    def store_points(store: Path, name: str) -> list[Any]:
        client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
        experiment = client.get_experiment_by_name(name)
        assert experiment is not None
        return point_runs(client, experiment.experiment_id)

    return store_points


def _by_name(runs: list[Any]) -> dict[str, Any]:
    return {r.info.run_name: r for r in runs}


@pytest.mark.slow
@pytest.mark.distributed
def test_ray_grid_records_what_the_local_executor_records(
    ray_cluster: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    write_experiment: Helper,
    tiny_training: Helper,
    store_points: Helper,
) -> None:
    from stackwise.executors.ray import RayExecutor

    monkeypatch.chdir(tmp_path)
    grid = {"training.training_architecture": ["rackwise", "stackwise"]}
    path = write_experiment(tmp_path, "rayvs", grid=grid, training=tiny_training(8))
    local = _run(path, tmp_path / "local")
    remote = _run(path, tmp_path / "ray", RayExecutor())
    assert local.exit_code == remote.exit_code == 0
    assert len(remote.finished) == 2
    here = _by_name(store_points(tmp_path / "local", "rayvs"))
    there = _by_name(store_points(tmp_path / "ray", "rayvs"))
    assert set(here) == set(there) == {"mode=rackwise", "mode=stackwise"}
    for name, run in here.items():
        other = there[name]
        assert other.info.status == "FINISHED"
        assert other.data.params == run.data.params
        assert other.data.tags["config_hash"] == run.data.tags["config_hash"]
        # Nested under the driver's parent run of its own store.
        parent = other.data.tags["mlflow.parentRunId"]
        assert parent == remote.parent_run_ids["rayvs"]
        for key in ("final/loss", "train/loss"):
            assert math.isclose(other.data.metrics[key], run.data.metrics[key], rel_tol=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_ray_task_killed_fails_its_point_the_others_finish_rerun_completes(
    ray_cluster: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    write_experiment: Helper,
    tiny_training: Helper,
    store_points: Helper,
) -> None:
    from mlflow import MlflowClient

    from stackwise.executors.ray import RayExecutor

    monkeypatch.chdir(tmp_path)
    training = {**tiny_training(48), "log_every_steps": 2}
    path = write_experiment(
        tmp_path, "raykill", grid={"training.seed": [1, 2, 3]}, training=training
    )
    store = tmp_path / "store"
    victim = "seed=1"
    killed: list[int] = []

    def kill_victim() -> None:
        """SIGKILL the Ray worker training the victim once it has logged a step (the owner
        tag of a RUNNING run names its process)."""
        client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            time.sleep(0.2)
            try:
                experiment = client.get_experiment_by_name("raykill")
                if experiment is None:
                    continue
                runs = client.search_runs(
                    [experiment.experiment_id], "attributes.status = 'RUNNING'"
                )
            except Exception:  # the store is being created
                continue
            for run in runs:
                if run.info.run_name == victim and "train/loss" in run.data.metrics:
                    pid = int(run.data.tags["stackwise.owner"].rpartition(":")[2])
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

    killer = threading.Thread(target=kill_victim, daemon=True)
    killer.start()
    summary = _run(path, store, RayExecutor())
    killer.join(timeout=5)
    assert killed, "the victim was never seen training"
    assert summary.exit_code == 1
    assert [run for _, run, _ in summary.failed] == [victim]
    assert sorted(run for _, run, _ in summary.finished) == ["seed=2", "seed=3"]
    points = _by_name(store_points(store, "raykill"))
    assert points[victim].info.status == "FAILED"
    assert "died" in points[victim].data.tags["error"].lower(), points[victim].data.tags["error"]
    assert {points[n].info.status for n in ("seed=2", "seed=3")} == {"FINISHED"}

    again = _run(path, store, RayExecutor())
    assert again.exit_code == 0
    assert sorted(run for _, run, _ in again.skipped) == ["seed=2", "seed=3"]
    assert [run for _, run, _ in again.finished] == [victim]
    statuses = [r.info.status for r in store_points(store, "raykill") if r.info.run_name == victim]
    assert "FINISHED" in statuses


# --------------------------------------------------------------------------------------------
# torchrun
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_give_the_loss_curve_of_one(
    tmp_path: Path,
    write_experiment: Helper,
    tiny_training: Helper,
    run_cli: Helper,
    point_runs: PointRuns,
) -> None:
    from mlflow import MlflowClient

    training = {**tiny_training(8), "log_every_steps": 1, "grad_accum_steps": 2}
    grid = {"training.training_architecture": ["rackwise", "blockwise"]}
    path = write_experiment(tmp_path, "ddp", grid=grid, training=training)
    one = run_cli(tmp_path, "run", str(path), "--tracking-uri", "one")
    two = run_cli(tmp_path, "run", str(path), "--tracking-uri", "two", "--nproc", "2")
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 finished, 0 skipped, 0 failed" in two.stdout

    def curves(store: str) -> dict[str, Any]:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / store}/mlflow.db")
        experiment = client.get_experiment_by_name("ddp")
        assert experiment is not None
        runs = point_runs(client, experiment.experiment_id)
        # Rank 0 alone writes: one run per point, every metric once per step.
        assert sorted(r.info.run_name for r in runs) == ["mode=blockwise", "mode=rackwise"]
        out = {}
        for run in runs:
            history = {}
            for key in ("train/loss", "train/tokens", "train/grad_norm"):
                points = client.get_metric_history(run.info.run_id, key)
                steps = [m.step for m in points]
                assert len(steps) == len(set(steps)), (key, steps)
                history[key] = {m.step: m.value for m in points}
            history["final/loss"] = run.data.metrics["final/loss"]
            out[run.info.run_name] = history
        return out

    single, parallel = curves("one"), curves("two")
    for name, expected in single.items():
        got = parallel[name]
        steps = sorted(expected["train/loss"])
        assert steps == sorted(got["train/loss"]) == list(range(1, len(steps) + 1))
        for step in steps:
            assert math.isclose(
                got["train/loss"][step], expected["train/loss"][step], rel_tol=1e-5
            ), (name, step)
            # Tokens are the global batch's: 4 rows x 32 positions x 2 micro-batches a step.
            assert got["train/tokens"][step] == expected["train/tokens"][step] == step * 256
        assert math.isclose(got["final/loss"], expected["final/loss"], rel_tol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_run_stopped_by_sigterm_resumes_with_the_same_world_size(
    tmp_path: Path,
    write_experiment: Helper,
    tiny_training: Helper,
    run_cli: Helper,
    cli_command: Helper,
    cli_env: Helper,
    point_runs: PointRuns,
) -> None:
    import sqlite3
    import subprocess

    from mlflow import MlflowClient

    training = {**tiny_training(40), "log_every_steps": 1, "training_architecture": "stackwise"}
    path = write_experiment(tmp_path, "resume", training=training)
    one = run_cli(tmp_path, "run", str(path), "--tracking-uri", "one", "--quiet")
    assert one.returncode == 0, one.stdout + one.stderr
    driver = subprocess.Popen(
        cli_command("run", str(path), "--tracking-uri", "two", "--nproc", "2"),
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    database = tmp_path / "two" / "mlflow.db"
    deadline = time.monotonic() + 240
    logged = 0
    while logged < 14 and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.3)
        try:
            with sqlite3.connect(database) as db:
                query = "select count(*) from metrics where key = 'train/loss'"
                logged = db.execute(query).fetchone()[0]
        except sqlite3.Error:
            continue
    assert 14 <= logged < 40, logged  # stopped in the middle of the run
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=180) == 128 + signal.SIGTERM
    again = run_cli(tmp_path, "run", str(path), "--tracking-uri", "two", "--nproc", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming" in again.stdout

    def history(store: str) -> tuple[list[Any], dict[int, float]]:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / store}/mlflow.db")
        experiment = client.get_experiment_by_name("resume")
        assert experiment is not None
        runs = point_runs(client, experiment.experiment_id)
        loss = client.get_metric_history(runs[0].info.run_id, "train/loss")
        assert sorted(m.step for m in loss) == list(range(1, 41))  # each step once
        return runs, {m.step: m.value for m in loss}

    (single,), expected = history("one")
    runs, got = history("two")
    assert [r.info.status for r in runs] == ["FINISHED"]  # resumed inside its run
    for step, value in expected.items():
        assert math.isclose(got[step], value, rel_tol=1e-5), step
    assert math.isclose(
        runs[0].data.metrics["final/loss"], single.data.metrics["final/loss"], rel_tol=1e-5
    )
