"""Grid points elsewhere: --jobs (subprocesses), Ray tasks, torchrun (DDP over gloo).

The engine tests are `distributed` (and `slow`): `nox -s distributed` runs them with Ray
installed; there, a missing Ray is a failure, not a skip (STACKWISE_REQUIRE_RAY=1).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
# stopping: signals, and the store on the way out
# --------------------------------------------------------------------------------------------


def test_a_stop_signal_a_library_turns_into_ctrl_c_keeps_its_exit_status() -> None:
    """Ray catches the exception a signal handler raises inside ``ray.wait`` and raises a plain
    KeyboardInterrupt in its place: the runner still reports SIGTERM (exit 143), not Ctrl-C."""
    from stackwise.runner import Interrupted, signals_as_interrupts

    with pytest.raises(KeyboardInterrupt) as caught, signals_as_interrupts():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt:
            raise KeyboardInterrupt from None  # what Ray raises instead
    assert isinstance(caught.value, Interrupted)
    assert caught.value.signum == signal.SIGTERM


@pytest.fixture(name="ctrl_c")
def ctrl_c_fixture() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in this process, as in a terminal: a shell starts a
    background job (`nox … &`) with SIGINT ignored, and Python keeps it so."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    ("sig", "raised"), [(signal.SIGTERM, "Interrupted"), (signal.SIGINT, "KeyboardInterrupt")]
)
def test_a_signal_during_a_deferred_step_stops_the_run_right_after_it(
    sig: signal.Signals, raised: str, ctrl_c: None
) -> None:
    """Handing a task to Ray and recording it, starting a job, shutting a cluster down: a signal
    meanwhile waits for the step to end, then stops the run as it would have."""
    from stackwise.runner import signals_as_interrupts, signals_deferred

    steps = []
    with pytest.raises(KeyboardInterrupt) as caught, signals_as_interrupts():
        with signals_deferred():
            os.kill(os.getpid(), sig)
            time.sleep(0.2)
            steps.append("step done")
        steps.append("after the step")
    assert steps == ["step done"]
    assert type(caught.value).__name__ == raised
    assert getattr(caught.value, "signum", signal.SIGINT) == sig


def test_an_interrupt_inside_a_store_read_leaves_no_lock_once_released(tmp_path: Path) -> None:
    """Ctrl-C that lands as an MLflow query returns leaves its SQLite cursor open, held by the
    interrupt's traceback: the database is locked, for this process too (it could not mark its
    run KILLED; the probe of a Ray driver waited 6 minutes on that). Released, it is not."""
    import sqlite3

    from mlflow import MlflowClient
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from stackwise.tracking.store import end_run_or_say_why, release_interrupted_calls

    database = tmp_path / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    run_id = client.create_run(client.create_experiment("x")).info.run_id

    def writable() -> bool:
        """Whether another connection can commit a write (a reader's lock holds that off)."""
        with contextlib.closing(sqlite3.connect(database, timeout=0.1)) as other:
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("COMMIT")
            except sqlite3.OperationalError as error:
                assert "database is locked" in str(error)
                return False
            return True

    armed = [True]

    def ctrl_c(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if armed and statement.lstrip().upper().startswith("SELECT"):
            armed.clear()
            raise KeyboardInterrupt  # as if Ctrl-C arrived while the query ran

    event.listen(Engine, "after_cursor_execute", ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            client.get_run(run_id)
    finally:
        event.remove(Engine, "after_cursor_execute", ctrl_c)
    assert not writable()  # what an interrupted call leaves
    release_interrupted_calls(caught.value)
    assert writable()
    assert end_run_or_say_why(client, run_id, "KILLED") is None
    assert client.get_run(run_id).info.status == "KILLED"


def test_ctrl_c_while_a_point_opens_its_run_leaves_no_run_running(
    tmp_path: Path, write_experiment: Helper, tiny_training: Helper
) -> None:
    """Ctrl-C that lands while a point logs the params of its new run, before its training (and
    the handler that marks a training run KILLED) begins: the grid closes that run KILLED too,
    and the rerun continues inside it."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    path = write_experiment(tmp_path, "early", training=tiny_training(4))
    store = tmp_path / "store"
    uri = f"sqlite:///{store}/mlflow.db"

    armed = [True]

    def ctrl_c(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if armed and statement.lstrip().startswith("INSERT INTO params"):
            armed.clear()
            raise KeyboardInterrupt

    event.listen(Engine, "after_cursor_execute", ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(path, store)
    finally:
        event.remove(Engine, "after_cursor_execute", ctrl_c)
    assert not armed  # it landed
    (point,) = assert_stopped(uri, "early").values()
    again = _run(path, store)
    assert again.exit_code == 0
    assert assert_one_finished_run_per_point(uri, "early", {"default"}) == {"default": point}


def test_a_point_that_fails_as_it_stops_is_killed_not_failed(
    tmp_path: Path, write_experiment: Helper, tiny_training: Helper, ctrl_c: None
) -> None:
    """Ctrl-C mid-training, and the checkpoint written on the way out fails (here its folder is
    a file; a Ctrl-C inside a lazy import of torch's leaves a half-made module the save then
    trips on): the point was stopped, not failed, so its run is KILLED and the stop goes on."""
    from mlflow import MlflowClient

    from stackwise.runner import point_of
    from stackwise.tracking.store import checkpoint_dir

    # One checkpoint only: the one written when it stops.
    training = {**tiny_training(2000), "checkpoint": {"every_steps": 100000}}
    path = write_experiment(tmp_path, "late", training=training, tracking={"log_model": False})
    store = tmp_path / "store"
    uri = f"sqlite:///{store}/mlflow.db"
    (spec,) = _plans(path)[0][1]

    def stop_once_training() -> None:
        folder = checkpoint_dir(uri, "late", point_of(spec, uri).identity)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.2)
            with contextlib.suppress(Exception):  # the store is being created
                client = MlflowClient(tracking_uri=uri)
                experiment = client.get_experiment_by_name("late").experiment_id
                (run,) = client.search_runs([experiment], "tags.`stackwise.role` = 'point'")
                if "train/loss" in run.data.metrics:
                    break
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.write_text("in the way")
        os.kill(os.getpid(), signal.SIGINT)

    stopper = threading.Thread(target=stop_once_training, daemon=True)
    stopper.start()
    with pytest.raises(KeyboardInterrupt):
        _run(path, store)
    stopper.join(timeout=10)
    assert_stopped(uri, "late")


class Driver:
    """`stackwise <args>` in the background in a session of its own (Ray's processes, jobs and
    torchrun launches are in it too), its output collected as it comes."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        import subprocess

        self.lines: list[str] = []
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            # A runner under `nohup` ignores SIGHUP and hands that on: start it as a terminal
            # would.
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, condition: Callable[[], object], timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"ended early:\n{self.finish()}"
            assert time.monotonic() < deadline, f"timed out:\n{self.output}"
            time.sleep(0.1)

    def wait_for_points(self, store: str, name: str, count: int, timeout: float = 240) -> None:
        """Until `count` point runs of experiment `name` are RUNNING and have logged a step
        (the store is read once the driver has opened the grid: creating its tables from two
        processes at once is a race MLflow loses)."""
        self.wait_for(lambda: " run(s) → " in self.output, timeout)
        self.wait_for(lambda: len(live_points(store, name, with_metric=True)) >= count, timeout)

    def finish(self, timeout: float = 300) -> str:
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.output

    def left_behind(self, within: float = 20) -> list[str]:
        """Processes of its session still there `within` seconds after it ended."""
        import psutil

        deadline = time.monotonic() + within
        while True:
            left = []
            for process in psutil.process_iter(["name", "status"]):
                with contextlib.suppress(psutil.Error, OSError):
                    if (
                        process.info["status"] != psutil.STATUS_ZOMBIE
                        and os.getsid(process.pid) == self.process.pid
                    ):
                        left.append(process.info["name"])
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)


def runs_of(store: str, name: str) -> list[Any]:
    """Every run of experiment `name` in the store at URI `store` (point and parent runs)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(name)
    return [] if experiment is None else list(client.search_runs([experiment.experiment_id]))


def live_points(store: str, name: str, with_metric: bool = False) -> list[Any]:
    """The RUNNING point runs of experiment `name` (those that logged a step, if asked)."""
    try:
        runs = runs_of(store, name)
    except Exception:  # the store is being created
        return []
    return [
        run
        for run in runs
        if run.info.status == "RUNNING"
        and run.data.tags.get("stackwise.role") == "point"
        and (not with_metric or "train/loss" in run.data.metrics)
    ]


def assert_stopped(store: str, name: str) -> dict[str, str]:
    """Nothing of experiment `name` RUNNING: parent runs and any point run KILLED. Returns the
    point runs' ids by run name."""
    runs = runs_of(store, name)
    statuses = {(r.data.tags.get("stackwise.role"), r.info.status) for r in runs}
    errors = [r.data.tags.get("error") for r in runs if r.info.status != "KILLED"]
    assert statuses <= {("grid", "KILLED"), ("point", "KILLED")}, (statuses, errors)
    assert ("grid", "KILLED") in statuses
    return {
        r.data.tags.get("stackwise.run_name"): r.info.run_id
        for r in runs
        if r.data.tags["stackwise.role"] == "point"
    }


def assert_one_finished_run_per_point(store: str, name: str, points: set[str]) -> dict[str, str]:
    runs = [r for r in runs_of(store, name) if r.data.tags.get("stackwise.role") == "point"]
    assert sorted(r.data.tags.get("stackwise.run_name") for r in runs) == sorted(points)
    assert {r.info.status for r in runs} == {"FINISHED"}
    return {r.data.tags.get("stackwise.run_name"): r.info.run_id for r in runs}


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
            runs.setdefault(run.data.tags.get("stackwise.run_name"), []).append(run)
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


def _owner_pid(run: Any) -> int:
    return int(run.data.tags["stackwise.owner"].rpartition(":")[2])


def _kill_and_wait(pid: int) -> None:
    """SIGKILL process `pid` (not a child of this one) and wait until it is gone."""
    import psutil

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout=30)


def test_the_processes_a_driver_started_end_when_it_is_killed_outright(tmp_path: Path) -> None:
    """`reaper.watch`: SIGKILL of the driver ends the tree of processes it started (as a local
    Ray cluster's helpers), none of the others; a driver that stops its watcher (as the Ray
    executor does once its cluster is down) and ends leaves its processes alone."""
    import subprocess

    import psutil

    code = (
        "import subprocess, sys, time\n"
        "from stackwise.executors.reaper import watch\n"
        "child = subprocess.Popen(['sh', '-c', 'sleep 120 & sleep 120; wait'])\n"
        "watcher = watch()\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(float(sys.argv[1]))\n"
        "watcher.kill()\n"
        "watcher.wait()\n"
    )
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        for how in ("killed", "ends"):
            driver = subprocess.Popen(
                [sys.executable, "-c", code, "120" if how == "killed" else "2"],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            assert driver.stdout is not None
            child = psutil.Process(int(driver.stdout.readline()))
            deadline = time.monotonic() + 30
            while len(child.children()) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            tree = [child, *child.children(recursive=True)]
            assert len(tree) == 3  # sh and its two sleeps
            time.sleep(1.5)  # the watcher has seen the whole tree
            if how == "killed":
                driver.kill()
                driver.wait()
                _, alive = psutil.wait_procs(tree, timeout=15)
                assert alive == [], alive
            else:
                driver.wait()
                time.sleep(2)
                assert all(p.is_running() for p in tree)  # not killed
                for process in tree:
                    process.kill()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_killed_drivers_folder_stays_while_its_jobs_run_and_is_swept_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `--jobs`/`--nproc` driver's task folder goes when the driver ends; one a SIGKILL left
    behind stays while a job of that driver still runs (it holds the folder's lock) and is swept
    once the last of them has ended."""
    import subprocess
    import tempfile

    from stackwise.executors.common import driver_folder, sweep_driver_folders

    temp = tmp_path / "tmp"
    temp.mkdir()
    code = (
        "import subprocess, sys\n"
        "from stackwise.executors.common import driver_folder\n"
        "with driver_folder('jobs') as (folder, held):\n"
        "    job = subprocess.Popen(['sleep', '60'], pass_fds=(held,))\n"
        "    print(folder, job.pid, flush=True)\n"
        "    job.wait()\n"
    )
    env = {**os.environ, "TMPDIR": str(temp)}
    driver = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )
    assert driver.stdout is not None
    folder_text, job_pid = driver.stdout.readline().split()
    folder = Path(folder_text)
    assert folder.parent == temp and folder.name.startswith(f"stackwise-jobs-{driver.pid}-")
    driver.kill()
    driver.wait()
    assert folder.is_dir()  # nothing ran to remove it
    assert sweep_driver_folders(temp) == [] and folder.is_dir()  # its job still runs
    _kill_and_wait(int(job_pid))
    assert sweep_driver_folders(temp) == [folder] and not folder.exists()

    # Any other end removes it at once.
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with pytest.raises(KeyboardInterrupt), driver_folder("torchrun") as (own, _):
        assert own.parent == temp and own.is_dir()
        raise KeyboardInterrupt
    assert list(temp.iterdir()) == []


@pytest.mark.slow
@pytest.mark.distributed
def test_jobs_killed_outright_a_rerun_sweeps_their_folder_and_continues_their_runs(
    tmp_path: Path,
    write_experiment: Helper,
    tiny_training: Helper,
    cli_command: Helper,
    cli_env: Helper,
) -> None:
    """SIGKILL of one job (the driver marks its point FAILED, its process lost), then of the
    driver: its task folder stays while its other job runs (that job holds it), and the next
    `--jobs` run sweeps it; that rerun continues both points inside their runs."""
    import subprocess

    from stackwise.executors.common import sweep_driver_folders

    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**cli_env(tmp_path), "TMPDIR": str(temp)}
    path = write_experiment(
        tmp_path,
        "jobskill",
        grid={"training.seed": [1, 2]},
        # No checkpoint before the end: the reruns restart inside the runs of the lost jobs. The
        # budget keeps both jobs training for many seconds also on a fast, idle machine.
        training={**tiny_training(3000), "checkpoint": {"every_steps": 100000}},
        tracking={"log_model": False},
    )
    store = default_tracking_uri(tmp_path)
    driver = Driver(cli_command("run", str(path), "--jobs", "2"), tmp_path, env)
    driver.wait_for_points(store, "jobskill", 2)
    (folder,) = temp.glob(f"stackwise-jobs-{driver.process.pid}-*")
    jobs = {run.data.tags.get("stackwise.run_name"): run for run in live_points(store, "jobskill")}
    _kill_and_wait(_owner_pid(jobs["seed=1"]))
    driver.wait_for(lambda: "seed=1: FAILED" in driver.output)
    driver.process.kill()
    driver.finish()
    assert folder.is_dir()
    assert sweep_driver_folders(temp) == [] and folder.is_dir()  # held by the job still running
    _kill_and_wait(_owner_pid(jobs["seed=2"]))
    lost = {
        r.data.tags.get("stackwise.run_name"): r
        for r in runs_of(store, "jobskill")
        if r.data.tags.get("stackwise.run_name") in jobs
    }
    assert lost["seed=1"].info.status == "FAILED"
    assert "SIGKILL" in lost["seed=1"].data.tags["error"]
    assert lost["seed=2"].info.status == "RUNNING"

    again = subprocess.run(
        cli_command("run", str(path), "--jobs", "2"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert list(temp.glob("stackwise-*")) == []  # the stale folder swept, its own removed
    finished = assert_one_finished_run_per_point(store, "jobskill", {"seed=1", "seed=2"})
    assert finished == {name: run.info.run_id for name, run in jobs.items()}  # same runs
    assert "error" not in {k for r in runs_of(store, "jobskill") for k in r.data.tags}


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
    return {r.data.tags.get("stackwise.run_name"): r for r in runs}


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
    # No checkpoint before the end: the victim dies with nothing to resume from (the state
    # that left two runs of a point before a rerun continued inside the lost one).
    training = {**tiny_training(48), "log_every_steps": 2, "checkpoint": {"every_steps": 1000}}
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
                if (
                    run.data.tags.get("stackwise.run_name") == victim
                    and "train/loss" in run.data.metrics
                ):
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
    # Continued inside its FAILED run (its process was lost; the point did not fail), as a
    # `--jobs` rerun does: one run, FINISHED, without the error of the lost process.
    (rerun,) = [
        r for r in store_points(store, "raykill") if r.data.tags.get("stackwise.run_name") == victim
    ]
    assert rerun.info.run_id == points[victim].info.run_id
    assert rerun.info.status == "FINISHED" and "error" not in rerun.data.tags


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("sig", "when"),
    [(signal.SIGINT, "tasks start"), (signal.SIGTERM, "points train")],
    ids=["SIGINT-as-tasks-start", "SIGTERM-as-points-train"],
)
def test_ray_driver_stopped_by_a_signal_leaves_nothing_running_and_a_rerun_resumes(
    sig: signal.Signals,
    when: str,
    tmp_path: Path,
    write_experiment: Helper,
    tiny_training: Helper,
    cli_command: Helper,
    cli_env: Helper,
    run_cli: Helper,
) -> None:
    """The documented stop through the CLI on a local Ray cluster: exit 128 + signal with its
    line, no traceback and no wait on a locked store, the point and parent runs KILLED, no Ray
    process left, and a rerun that finishes each point inside the run it had."""
    if os.environ.get("STACKWISE_REQUIRE_RAY") != "1":
        pytest.importorskip("ray")
    training = {**tiny_training(1000), "log_every_steps": 2}  # seconds also on a fast machine
    grid = {"training.seed": [1, 2]}
    path = write_experiment(tmp_path, "raystop", grid=grid, training=training)
    store = default_tracking_uri(tmp_path)
    args = ("run", str(path), "--executor", "ray")
    driver = Driver(cli_command(*args), tmp_path, cli_env(tmp_path))
    if when == "tasks start":  # handed to Ray, their workers not yet running the points
        driver.wait_for(lambda: driver.output.count(": started") == 2)
    else:
        driver.wait_for_points(store, "raystop", 1)
    stopped = time.monotonic()
    driver.process.send_signal(sig)
    output = driver.finish(timeout=240)
    took = time.monotonic() - stopped
    assert driver.process.returncode == 128 + sig, output
    word = "interrupted" if sig == signal.SIGINT else sig.name
    assert f"{word}: the run in progress is marked KILLED" in output
    assert "Traceback" not in output and "database is locked" not in output, output
    assert took < 120, took  # the tasks stopped at once, nothing waited on a lock
    killed = assert_stopped(store, "raystop")
    if when == "points train":
        assert killed  # a point had started: its run KILLED, not FAILED
    assert driver.left_behind() == []  # the local cluster went with the driver

    again = run_cli(tmp_path, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    finished = assert_one_finished_run_per_point(store, "raystop", {"seed=1", "seed=2"})
    assert killed.items() <= finished.items()  # resumed inside the runs it had
    print(f"Ray driver stopped by {sig.name} as {when} in {took:.1f} s")


@pytest.mark.slow
@pytest.mark.distributed
def test_ray_driver_killed_outright_takes_its_local_cluster_with_it(
    tmp_path: Path,
    write_experiment: Helper,
    tiny_training: Helper,
    cli_command: Helper,
    cli_env: Helper,
    run_cli: Helper,
) -> None:
    """SIGKILL of a driver running a local Ray cluster: no process of that cluster (GCS,
    raylet, its agents and workers) outlives it by more than a few seconds, and a rerun
    finishes every point."""
    if os.environ.get("STACKWISE_REQUIRE_RAY") != "1":
        pytest.importorskip("ray")
    training = {**tiny_training(1000), "log_every_steps": 2}
    path = write_experiment(tmp_path, "raykill9", grid={"training.seed": [1, 2]}, training=training)
    store = default_tracking_uri(tmp_path)
    args = ("run", str(path), "--executor", "ray")
    driver = Driver(cli_command(*args), tmp_path, cli_env(tmp_path))
    driver.wait_for_points(store, "raykill9", 1)
    driver.process.kill()
    driver.finish(timeout=60)
    assert driver.left_behind(within=15) == []  # Ray's own helpers linger about a minute

    again = run_cli(tmp_path, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_one_finished_run_per_point(store, "raykill9", {"seed=1", "seed=2"})


# --------------------------------------------------------------------------------------------
# torchrun
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_driver_stopped_by_sighup_as_ranks_start_leaves_nothing_behind(
    tmp_path: Path,
    write_experiment: Helper,
    tiny_training: Helper,
    cli_command: Helper,
    cli_env: Helper,
) -> None:
    """SIGHUP (a closed terminal) while a point's ranks start: exit 129 with its line, the runs
    KILLED, no rank, launcher or task folder left; a rerun finishes every point."""
    import subprocess

    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**cli_env(tmp_path), "TMPDIR": str(temp)}
    training = {**tiny_training(16), "log_every_steps": 1}
    grid = {"training.seed": [1, 2]}
    path = write_experiment(tmp_path, "hup", grid=grid, training=training)
    store = default_tracking_uri(tmp_path)
    args = ("run", str(path), "--nproc", "2")
    driver = Driver(cli_command(*args), tmp_path, env)
    driver.wait_for(lambda: "seed=1: started (torchrun" in driver.output)
    driver.process.send_signal(signal.SIGHUP)
    output = driver.finish(timeout=240)
    assert driver.process.returncode == 128 + signal.SIGHUP, output
    assert "SIGHUP: the run in progress is marked KILLED" in output
    assert "database is locked" not in output
    assert_stopped(store, "hup")
    assert driver.left_behind() == []
    assert list(temp.glob("stackwise-*")) == []

    again = subprocess.run(
        cli_command(*args),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert_one_finished_run_per_point(store, "hup", {"seed=1", "seed=2"})


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
    # Prepared shards: each process reads only the rows it keeps of every batch.
    prepared = run_cli(
        tmp_path, "data", "prepare", str(write_experiment(tmp_path, "corpus")), "-o", "shards"
    )
    assert prepared.returncode == 0, prepared.stderr
    data = {"source": "prepared", "paths": ["shards"]}
    path = write_experiment(tmp_path, "ddp", grid=grid, training=training, data=data)
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
        assert sorted(r.data.tags.get("stackwise.run_name") for r in runs) == [
            "mode=blockwise",
            "mode=rackwise",
        ]
        out = {}
        for run in runs:
            history = {}
            for key in ("train/loss", "train/tokens", "train/grad_norm"):
                points = client.get_metric_history(run.info.run_id, key)
                steps = [m.step for m in points]
                assert len(steps) == len(set(steps)), (key, steps)
                history[key] = {m.step: m.value for m in points}
            history["final/loss"] = run.data.metrics["final/loss"]
            out[run.data.tags.get("stackwise.run_name")] = history
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
