"""Runs without a logged model, through the real CLI and a real MLflow store: a FINISHED point
trained with ``tracking.log_model: false`` gets its model when its final weights are still
there, and otherwise says exactly how to get one; `stackwise generate`/`export` name why a run
has no model (still RUNNING, killed, log_model off) instead of guessing.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Helper = Callable[..., Any]

MODEL = {"d_model": 16, "n_heads": 2, "architecture": {"n_stacks": 1, "blocks_per_stack": 1}}


def training(steps: int) -> dict[str, Any]:
    return {
        "budget": {"steps": steps},
        "batch_size": 2,
        "seq_len": 16,
        "log_every_steps": 4,
        "device": "cpu",
        "eval": {"batches": 1},
        "checkpoint": {"every_steps": 4},
    }


def write(folder: Path, write_experiment: Helper, name: str, steps: int = 8, **more: Any) -> Path:
    return write_experiment(
        folder, name, training=training(steps), model=MODEL, data={"max_tokens": 5000}, **more
    )


def client_of(folder: Path) -> Any:
    from mlflow import MlflowClient

    from stackwise.tracking.store import default_tracking_uri

    return MlflowClient(tracking_uri=default_tracking_uri(folder))


def point_runs(folder: Path, name: str) -> dict[str, Any]:
    """The point runs of experiment `name`, by run name (the newest of each name)."""
    client = client_of(folder)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`stackwise.role` = 'point'",
        order_by=["attributes.start_time ASC"],
    )
    return {run.data.tags["stackwise.run_name"]: run for run in runs}


def logged_models(folder: Path, run: Any) -> list[Any]:
    """The models MLflow has recorded for `run` (its own search, not StackWise's)."""
    client = client_of(folder)
    return list(
        client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
    )


def flat(text: str) -> str:
    """Output with its line wrapping undone."""
    return " ".join(text.split())


def one_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


# --------------------------------------------------------------------------------------------
# a FINISHED point trained with log_model off
# --------------------------------------------------------------------------------------------


def trained_without_models(folder: Path, write_experiment: Helper, cli: Helper) -> Path:
    """A grid of two points trained with log_model off (their runs FINISHED, no model)."""
    path = write(
        folder,
        write_experiment,
        "nomodel",
        grid={"training.optimizer.lr": [0.001, 0.003]},
        tracking={"log_model": False},
    )
    first = cli("run", path, "--quiet", cwd=folder)
    assert first.returncode == 0, first.stdout + first.stderr
    return path


def retrain_hint(path: Path) -> str:
    return f"stackwise run {path} --force --only lr=0.001 --set tracking.log_model=true"


@pytest.mark.slow  # about a minute: trains a grid twice through the CLI
def test_a_point_trained_without_its_model_says_how_to_get_it(
    tmp_path: Path, write_experiment: Helper, cli: Helper
) -> None:
    path = trained_without_models(tmp_path, write_experiment, cli)
    runs = point_runs(tmp_path, "nomodel")

    # A normal rerun with log_model on skips the finished points, saying what is missing and
    # the command that trains one again with its model.
    again = cli("run", path, "--set", "tracking.log_model=true", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    output = flat(again.stdout)
    assert "0 finished, 2 skipped, 0 failed" in output
    for point in runs.values():
        assert f"already FINISHED (run {point.info.run_id}) without a logged model" in output
    match = re.search(r"train it again: (stackwise run .*?--only lr=0\.001 .*?) \(with", output)
    assert match is not None, output
    assert match.group(1) == retrain_hint(path)
    assert not any(logged_models(tmp_path, point) for point in runs.values())

    # generate names the same cause and command.
    run_id = runs["lr=0.001"].info.run_id
    error = one_error(cli("generate", run_id, cwd=tmp_path))
    assert f"run {run_id} (lr=0.001) has no logged model" in error
    assert "it trained with tracking.log_model: false" in error
    assert retrain_hint(path) in error and "was off?" not in error


@pytest.mark.slow
def test_the_command_it_gives_trains_that_point_again_with_its_model(
    tmp_path: Path, write_experiment: Helper, cli: Helper
) -> None:
    path = trained_without_models(tmp_path, write_experiment, cli)
    run = point_runs(tmp_path, "nomodel")["lr=0.001"]
    error = one_error(cli("export", run.info.run_id, "out", "--format", "hf", cwd=tmp_path))
    assert "it trained with tracking.log_model: false" in error and retrain_hint(path) in error
    assert not (tmp_path / "out").exists()

    command = shlex.split(retrain_hint(path))
    fixed = cli(*command[1:], cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "1 finished, 0 skipped, 0 failed" in flat(fixed.stdout)
    newest = point_runs(tmp_path, "nomodel")
    assert newest["lr=0.001"].info.run_id != run.info.run_id
    assert len(logged_models(tmp_path, newest["lr=0.001"])) == 1
    assert not logged_models(tmp_path, newest["lr=0.003"])


@pytest.mark.slow
def test_a_finished_point_whose_final_checkpoint_remains_gets_its_model_logged(
    tmp_path: Path,
    write_experiment: Helper,
    cli: Helper,
    assert_each_step_logged_once: Helper,
) -> None:
    """A process killed after marking its point FINISHED and before removing the point's
    checkpoints leaves the final weights: a rerun with log_model on logs them into that run."""
    from stackwise.api import load_data, train
    from stackwise.config.experiment import expand_grid, load_experiment
    from stackwise.runner import point_of
    from stackwise.runner.train import CHECKPOINT_RUN_ID, CHECKPOINT_TRAINER_HASH
    from stackwise.tracking.logger import TAG_CONFIG_HASH
    from stackwise.tracking.store import checkpoint_dir, default_tracking_uri

    path = write(tmp_path, write_experiment, "leftover", tracking={"log_model": False})
    first = cli("run", path, "--quiet", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    (run,) = point_runs(tmp_path, "leftover").values()
    assert not logged_models(tmp_path, run)

    # The point's final checkpoint as its run wrote it: same config, data and metadata.
    uri = default_tracking_uri(tmp_path)
    (spec,) = expand_grid(load_experiment(path))
    point = point_of(spec, uri)
    config, data = load_data(point.config)
    folder = checkpoint_dir(uri, "leftover", point.identity)
    metadata = {
        CHECKPOINT_RUN_ID: run.info.run_id,
        TAG_CONFIG_HASH: point.identity,
        CHECKPOINT_TRAINER_HASH: config.config_hash(),
    }
    train(config, data=data, checkpoint_dir=folder, checkpoint_metadata=metadata)
    assert folder.is_dir()

    again = cli("run", path, "--set", "tracking.log_model=true", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    output = flat(again.stdout)
    assert f"logging its model from its final checkpoint (run {run.info.run_id})" in output
    assert "1 finished, 0 skipped, 0 failed" in output
    (after,) = point_runs(tmp_path, "leftover").values()
    assert (after.info.run_id, after.info.status) == (run.info.run_id, "FINISHED")
    assert len(logged_models(tmp_path, after)) == 1
    assert not folder.exists()
    # The final weights are the run's: the same validation loss, and no step logged twice.
    assert after.data.metrics["final_val_loss"] == run.data.metrics["final_val_loss"]
    assert_each_step_logged_once(client_of(tmp_path), run.info.run_id)

    generated = cli("generate", run.info.run_id, "--max-new-tokens", "4", cwd=tmp_path)
    assert generated.returncode == 0, generated.stdout + generated.stderr


# --------------------------------------------------------------------------------------------
# a run that has not finished
# --------------------------------------------------------------------------------------------


def training_run(folder: Path, path: Path, process: subprocess.Popen[bytes]) -> Any:
    """The run of the one point of experiment file `path` once `process` trains it: found by
    its first checkpoint (the store is not touched while the process creates it)."""
    from stackwise.config.experiment import expand_grid, load_experiment
    from stackwise.runner import point_of
    from stackwise.runner.train import CHECKPOINT_RUN_ID
    from stackwise.tracking.store import checkpoint_dir, default_tracking_uri
    from stackwise.training.checkpoint import read_checkpoint_metadata

    uri = default_tracking_uri(folder)
    (spec,) = expand_grid(load_experiment(path))
    checkpoints = checkpoint_dir(uri, spec.experiment_name, point_of(spec, uri).identity)
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and read_checkpoint_metadata(checkpoints)):
        assert process.poll() is None, "the run ended early"
        assert time.monotonic() < deadline, "the run never wrote a checkpoint"
        time.sleep(0.1)
    metadata = read_checkpoint_metadata(checkpoints)
    assert metadata is not None
    return client_of(folder).get_run(metadata[CHECKPOINT_RUN_ID])


@pytest.mark.slow
def test_generate_and_export_of_an_unfinished_run_say_why_it_has_no_model(
    tmp_path: Path, write_experiment: Helper, cli: Helper, cli_command: Helper, cli_env: Helper
) -> None:
    path = write(tmp_path, write_experiment, "unfinished", steps=100_000)
    process = subprocess.Popen(
        cli_command("run", str(path)),
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run = training_run(tmp_path, path, process)
        run_id = run.info.run_id
        for args in (("generate", run_id), ("export", run_id, "out", "--format", "safetensors")):
            error = one_error(cli(*args, cwd=tmp_path))
            assert f"run {run_id} (default) has no logged model: it is still RUNNING" in error
            assert f"(process {run.data.tags['stackwise.owner']})" in error
            assert "wait for it to finish" in error and "log_model" not in error
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)

    # Killed outright: still marked RUNNING, its process gone.
    error = one_error(cli("generate", run_id, cwd=tmp_path))
    assert "it is marked RUNNING but its process" in error and "is gone: it was killed" in error
    assert f"run `stackwise run {path}` again to resume it" in error

    # Marked KILLED (as the next `stackwise run` marks it before resuming it).
    client_of(tmp_path).set_terminated(run_id, status="KILLED")
    error = one_error(cli("export", run_id, "out", "--format", "safetensors", cwd=tmp_path))
    assert "it was KILLED before it finished" in error
    assert f"run `stackwise run {path}` again to resume it" in error
    assert not (tmp_path / "out").exists()
