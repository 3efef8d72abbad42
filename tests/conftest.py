"""Shared test setup and the helpers test modules share.

Tests run in parallel (pytest-xdist) on small machines: one intra-op thread per worker avoids
oversubscribing the cores, which otherwise makes tiny-model tests many times slower. Subprocesses
(the real CLI) inherit the same limit through OMP_NUM_THREADS.

Test modules never import each other or this file (tests/test_imports.py checks): what they
share is defined here and reaches them as fixtures. A fixture that hands out a helper function or
class is session-scoped, so module- and session-scoped fixtures can use it too.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)


# -- shared fixtures ---------------------------------------------------------------------------

import fcntl  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

CliRunner = Callable[..., "subprocess.CompletedProcess[str]"]


def run_console_script(
    *args: str | Path, cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The installed `stackwise` console script in a real subprocess (no tracking URI from the
    environment: the store is ./mlruns under `cwd` unless the arguments say otherwise)."""
    script = shutil.which("stackwise", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "stackwise"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "COLUMNS": "200"}
    return subprocess.run(
        [*command, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def cli() -> CliRunner:
    """`cli("run", path, cwd=folder)`: the console script in a subprocess (see
    `run_console_script`)."""
    return run_console_script


TinyConfig = Callable[..., Any]


def make_tiny_config(
    mode: str = "blockwise", objective: str = "clm", steps: int = 8, **training: Any
) -> Any:
    """A `StackWiseConfig` that trains in about a second on a CPU: a 2-stack x 1-block rack of
    width 32 on 30k bytes of the builtin corpus; `training` overrides training settings
    (``model=`` overrides model settings)."""
    from stackwise.config.base import StackWiseConfig

    model: dict[str, Any] = {
        "d_model": 32,
        "n_heads": 2,
        "architecture": {"n_stacks": 2, "blocks_per_stack": 1},
        "attention_mode": "causal" if objective == "clm" else "bidirectional",
    }
    model.update(training.pop("model", {}))
    return StackWiseConfig.from_dict(
        {
            "model": model,
            "training": {
                "training_architecture": mode,
                "objective": objective,
                "batch_size": 4,
                "seq_len": 32,
                "budget": {"steps": steps},
                "optimizer": {"lr": 3e-3},
                "schedule": {"warmup_fraction": 0.0},
                "device": "cpu",
                "eval": {"batches": 2},
                **training,
            },
            "data": {"max_tokens": 30_000},
        }
    )


@pytest.fixture
def tiny_config() -> TinyConfig:
    """`tiny_config("stackwise", "mlm", steps=4, **training)`: see `make_tiny_config`."""
    return make_tiny_config


# -- the command line as the tracking tests run it ----------------------------------------------
# `python -m stackwise` with the environment of `cli_env`, the working folder first:
# ``run_cli(cwd, "run", path)``. (The `cli` fixture above runs the installed console script.)


def cli_env(cwd: Path) -> dict[str, str]:
    """The environment of a CLI subprocess: no tracking URI (the store is ./mlruns under `cwd`),
    unbuffered output, wide lines, one intra-op thread."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"
    # Tests run in parallel on few cores: one intra-op thread per training process avoids
    # OpenMP oversubscription, which slows tiny models down by an order of magnitude.
    env["OMP_NUM_THREADS"] = "1"
    return env


def cli_command(*args: str) -> list[str]:
    """`python -m stackwise <args>` with this interpreter."""
    return [sys.executable, "-m", "stackwise", *args]


def run_cli(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`stackwise <args>` as a subprocess in `cwd` (default store: ``cwd/mlruns``)."""
    return subprocess.run(
        cli_command(*args),
        cwd=cwd,
        env=cli_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(name="cli_env", scope="session")
def cli_env_fixture() -> Callable[[Path], dict[str, str]]:
    """`cli_env(cwd)`: the environment of a CLI subprocess started in `cwd` (see `cli_env`)."""
    return cli_env


@pytest.fixture(name="cli_command", scope="session")
def cli_command_fixture() -> Callable[..., list[str]]:
    """`cli_command("run", path)`: the command line to start (see `cli_command`)."""
    return cli_command


@pytest.fixture(name="run_cli", scope="session")
def run_cli_fixture() -> Callable[..., subprocess.CompletedProcess[str]]:
    """`run_cli(cwd, "run", path)`: `stackwise` run to its end in `cwd` (see `run_cli`)."""
    return run_cli


# -- experiment files and what a grid records ---------------------------------------------------


def tiny_training(steps: int = 16) -> dict[str, Any]:
    """A training section that runs in about a second on a CPU."""
    return {
        "budget": {"steps": steps},
        "batch_size": 4,
        "seq_len": 32,
        "log_every_steps": 4,
        "device": "cpu",
        "eval": {"batches": 2},
        "checkpoint": {"every_steps": 4},
    }


def write_experiment(
    folder: Path,
    name: str,
    grid: dict[str, list[Any]] | None = None,
    training: dict[str, Any] | None = None,
    **sections: Any,
) -> Path:
    """An experiment file with a tiny rack, written to ``folder/<name>.yaml``."""
    document: dict[str, Any] = {
        "name": name,
        "model": {
            "d_model": 32,
            "n_heads": 2,
            "architecture": {"n_stacks": 2, "blocks_per_stack": 1},
        },
        "training": training or tiny_training(),
        "data": {"max_tokens": 20000},
    }
    for section, value in sections.items():
        document[section] = value
    if grid is not None:
        document["grid"] = grid
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def point_runs(client: Any, experiment_id: str) -> list[Any]:
    """The grid-point runs (not the parent runs) of an experiment."""
    return list(
        client.search_runs([experiment_id], filter_string="tags.`stackwise.role` = 'point'")
    )


def assert_each_step_logged_once(client: Any, run_id: str) -> None:
    """No metric of the run has two values at one step (replayed or repeated logging)."""
    for key in client.get_run(run_id).data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))


@pytest.fixture(name="tiny_training", scope="session")
def tiny_training_fixture() -> Callable[..., dict[str, Any]]:
    """`tiny_training(steps=16)`: a training section of about a second (see `tiny_training`)."""
    return tiny_training


@pytest.fixture(name="write_experiment", scope="session")
def write_experiment_fixture() -> Callable[..., Path]:
    """`write_experiment(folder, name, grid=..., training=..., **sections)`: a tiny experiment
    file (see `write_experiment`)."""
    return write_experiment


@pytest.fixture(name="point_runs", scope="session")
def point_runs_fixture() -> Callable[[Any, str], list[Any]]:
    """`point_runs(client, experiment_id)`: the grid-point runs of an experiment."""
    return point_runs


@pytest.fixture(name="assert_each_step_logged_once", scope="session")
def assert_each_step_logged_once_fixture() -> Callable[[Any, str], None]:
    """`assert_each_step_logged_once(client, run_id)`: no metric has two values at one step."""
    return assert_each_step_logged_once


# -- the shared tracked store --------------------------------------------------------------------

TRACKED_GRID = {"training.training_architecture": ["rackwise", "stackwise"]}


def shared_tracked_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CLI run of a two-point grid, shared by every test file and xdist worker (read-only):
    the first caller runs it under a file lock, later callers find its result on disk."""
    from mlflow import MlflowClient

    from stackwise.tracking.store import default_tracking_uri

    # Per test session: xdist workers share their session's folder (the parent of their own);
    # a plain run uses its own, never the user-wide parent that outlives the session (a store
    # left there by older code would be read back instead of testing this code).
    base = tmp_path_factory.getbasetemp()
    session = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    shared = session / "stackwise-tracked-store"
    shared.mkdir(exist_ok=True)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info_path = shared / "info.json"
        if not info_path.exists():
            path = write_experiment(shared, "tracked", grid=TRACKED_GRID)
            done = run_cli(shared, "run", str(path), "--quiet")
            info = {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
            info_path.write_text(json.dumps(info), encoding="utf-8")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    assert info["returncode"] == 0, info["stdout"] + info["stderr"]
    info["cwd"] = shared
    info["uri"] = default_tracking_uri(shared)
    info["file"] = shared / "tracked.yaml"
    info["client"] = client = MlflowClient(tracking_uri=info["uri"])
    experiment = client.get_experiment_by_name("tracked")
    assert experiment is not None
    info["experiment_id"] = experiment.experiment_id
    return info


@pytest.fixture(scope="session")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The shared tracked store (read it, never write to it): a real `stackwise run` of a
    two-point grid (rackwise and stackwise modes of a tiny rack, 16 steps) in a folder of its
    own; ``cwd``, ``uri``, ``file`` (the experiment file), ``client``, ``experiment_id`` and
    the run's ``stdout``/``stderr`` (see `shared_tracked_store`)."""
    return shared_tracked_store(tmp_path_factory)


# -- training callbacks --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def recording_callback() -> type:
    """The class of a callback that records what the trainer reports; ``recording_callback()``
    makes one. In the order reported: ``metrics`` (step, metrics) pairs, ``losses`` (each
    train/loss), ``stages`` (each stage started), ``results`` (each stage's result) and
    ``events`` ("train_start", "stage_start:<name>", "stage_end:<name>", "train_end");
    ``steps(key)`` and ``values(key)`` pick one metric out of ``metrics``."""
    from stackwise.training.callbacks import (
        StageInfo,
        StageResult,
        TrainingCallback,
        TrainingResults,
    )

    class RecordingCallback(TrainingCallback):
        def __init__(self) -> None:
            self.metrics: list[tuple[int, dict[str, float]]] = []
            self.losses: list[float] = []
            self.stages: list[StageInfo] = []
            self.results: list[StageResult] = []
            self.events: list[str] = []

        def on_train_start(self, stages: list[StageInfo]) -> None:
            self.events.append("train_start")

        def on_stage_start(self, stage: StageInfo, step: int) -> None:
            self.stages.append(stage)
            self.events.append(f"stage_start:{stage.name}")

        def on_metrics(self, metrics: dict[str, float], step: int) -> None:
            self.metrics.append((step, dict(metrics)))
            if "train/loss" in metrics:
                self.losses.append(metrics["train/loss"])

        def on_stage_end(self, result: StageResult, step: int) -> None:
            self.results.append(result)
            self.events.append(f"stage_end:{result.stage.name}")

        def on_train_end(self, results: TrainingResults) -> None:
            self.events.append("train_end")

        def steps(self, key: str = "train/loss") -> list[int]:
            """The steps at which `key` was reported."""
            return [step for step, metrics in self.metrics if key in metrics]

        def values(self, key: str = "train/loss") -> list[float]:
            """The values reported for `key`, in order."""
            return [metrics[key] for _, metrics in self.metrics if key in metrics]

    return RecordingCallback


@pytest.fixture(scope="session")
def interrupt_at() -> type:
    """The class of a callback that stops training: ``interrupt_at(step)`` raises
    KeyboardInterrupt when the training loss of `step` is reported."""
    from stackwise.training.callbacks import TrainingCallback

    class InterruptAt(TrainingCallback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_metrics(self, metrics: dict[str, float], step: int) -> None:
            if step == self.step and "train/loss" in metrics:
                raise KeyboardInterrupt

    return InterruptAt
