"""Tracking: a real `stackwise run` into a real MLflow store, and what it records.

A small grid (two training modes of a tiny rack) is run once through the CLI into a SQLite store
in a temporary folder; the tests read that store back: the experiment, the parent run and its
nested point runs, tags, params, step metrics, artifacts, and the logged model. The store is
built once per test session and shared between pytest-xdist workers (under a file lock): the
`tracked` fixture of conftest.py, which the other tracking test files read too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.identity import data_fingerprint, run_identity
from stackwise.tracking.logger import flatten_config
from stackwise.tracking.store import (
    checkpoint_dir,
    default_tracking_uri,
    local_root,
    resolve_tracking_uri,
    sqlite_path,
)

# --------------------------------------------------------------------------------------------
# store resolution (no MLflow needed)
# --------------------------------------------------------------------------------------------


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_tracking_uri()
    assert default == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert resolve_tracking_uri(config_uri="sqlite:///yaml.db") == (
        f"sqlite:///{tmp_path.resolve()}/yaml.db"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(config_uri="sqlite:///yaml.db") == "http://tracking.example:5000"
    assert resolve_tracking_uri("sqlite:////abs/flag.db", "sqlite:///yaml.db") == (
        "sqlite:////abs/flag.db"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # CI exports it empty: counts as unset
    assert resolve_tracking_uri() == default
    # Resolving never creates anything.
    assert not (tmp_path / "mlruns").exists()


def test_store_layout_paths(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path)
    assert sqlite_path(uri) == tmp_path.resolve() / "mlruns" / "mlflow.db"
    assert local_root(uri) == tmp_path.resolve() / "mlruns"
    assert checkpoint_dir(uri, "exp/1", "abc") == (
        tmp_path.resolve() / "mlruns" / "checkpoints" / "exp_1" / "abc"
    )
    file_uri = (tmp_path / "filestore").as_uri()  # MLflow's legacy file store, asked for by name
    assert local_root(file_uri) == tmp_path / "filestore"
    # Other databases keep their state beside them, one folder each: stores share nothing.
    assert local_root(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.stackwise"
    assert local_root(f"sqlite:///{tmp_path}/b.db") == tmp_path / "b.stackwise"
    assert local_root(f"sqlite:///{tmp_path}/mlflow.db") == tmp_path
    remote = {local_root(u) for u in ("http://h:5000", "http://h:5001", "postgresql://u@h/db")}
    assert len(remote) == 3 and all(
        r.parent == Path.cwd().resolve() / "mlruns" / "remote" for r in remote
    )


def test_plain_path_names_a_store_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--tracking-uri /data/runs` is laid out like ./mlruns (MLflow 3 refuses file stores)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path.resolve()
    assert resolve_tracking_uri("runs") == f"sqlite:///{root}/runs/mlflow.db"
    assert resolve_tracking_uri("mlruns") == default_tracking_uri(tmp_path)
    assert resolve_tracking_uri("~/x/store.db").endswith("/x/store.db")
    assert resolve_tracking_uri(config_uri="other/t.sqlite") == f"sqlite:///{root}/other/t.sqlite"
    assert not (tmp_path / "runs").exists()


def test_check_tracking_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import socket

    from stackwise.tracking.store import check_tracking_uri

    assert check_tracking_uri(default_tracking_uri(tmp_path)) is None
    assert check_tracking_uri("databricks") is None
    assert "unsupported tracking URI" in str(check_tracking_uri("foo://bar"))
    (tmp_path / "folder.db").mkdir()
    assert "is a folder" in str(check_tracking_uri(f"sqlite:///{tmp_path}/folder.db"))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert "no longer opens" in str(check_tracking_uri(tmp_path.as_uri()))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert check_tracking_uri(tmp_path.as_uri()) is None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        # Accepting connections is not enough: the server must answer MLflow's REST API.
        assert "did not answer within 1 s" in str(
            check_tracking_uri(f"http://127.0.0.1:{port}", timeout=1)
        )
    assert "cannot reach" in str(check_tracking_uri(f"http://127.0.0.1:{port}", timeout=2))
    assert not any(tmp_path.iterdir()) or [p.name for p in tmp_path.iterdir()] == ["folder.db"]


def test_flatten_config_dotted_and_limited() -> None:
    config = StackWiseConfig.from_dict(
        {"model": {"d_model": 32, "n_heads": 2, "stacks": [{"n_blocks": 1}, {"n_blocks": 2}]}}
    )
    flat = flatten_config(config.to_dict())
    assert flat["model.d_model"] == "32"
    assert flat["model.stacks.1.n_blocks"] == "2"
    assert flat["training.training_architecture"] == "rackwise"
    assert flat["model.vocab_size"] == "null"
    assert flat["training.optimizer.betas"] == "[0.9, 0.95]"
    long = flatten_config({"a": "x" * 10000})
    assert len(long["a"]) == 6000


# --------------------------------------------------------------------------------------------
# what a CLI run records
# --------------------------------------------------------------------------------------------


def test_run_prints_comparison_and_summary(tracked: dict[str, Any]) -> None:
    out = tracked["stdout"]
    assert "tracked: comparison" in out
    assert "2 finished, 0 skipped, 0 failed" in out
    # One table (the comparison): its headline columns, numbers to four significant digits;
    # no MLflow INFO lines about creating the store, no progress bar in a pipe.
    header = next(line for line in out.splitlines() if line.startswith("mode "))
    assert header.split() == [
        "mode",
        "val_loss",
        "test_loss",
        "flops",
        "training_memory_mb",
        "wall_time_s",
    ]
    assert "summary" not in out
    both = out + tracked["stderr"]
    assert "INFO mlflow" not in both and "━" not in both
    # Default store layout, created by the run.
    root = Path(tracked["cwd"]) / "mlruns"
    assert (root / "mlflow.db").is_file()
    assert (root / "artifacts").is_dir()


def test_parent_and_nested_point_runs(
    tracked: dict[str, Any], point_runs: Callable[[Any, str], list[Any]]
) -> None:
    client, experiment_id = tracked["client"], tracked["experiment_id"]
    points = point_runs(client, experiment_id)
    first_parents = {r.data.tags["mlflow.parentRunId"] for r in points}
    assert len(points) == 2
    assert {r.info.status for r in points} == {"FINISHED"}
    assert {r.data.tags["stackwise.run_name"] for r in points} == {
        "mode=rackwise",
        "mode=stackwise",
    }
    # The UI shows a short name led by the mode; the full name stays a tag.
    assert {r.info.run_name for r in points} == {"rackwise", "stackwise"}
    assert len(first_parents) == 1
    parent = client.get_run(first_parents.pop())
    assert parent.data.tags["stackwise.role"] == "grid"
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "comparison.csv",
        "comparison.md",
        "loss_over_tokens.png",
        "val_loss_memory.png",
        "tracked.yaml",
    } <= artifacts


def test_point_tags_params_and_artifacts(
    tracked: dict[str, Any], point_runs: Callable[[Any, str], list[Any]]
) -> None:
    import stackwise

    client, experiment_id = tracked["client"], tracked["experiment_id"]
    for run in point_runs(client, experiment_id):
        tags, params = run.data.tags, run.data.params
        mode = tags["grid.mode"]
        assert tags["training_architecture"] == mode
        assert tags["objective"] == "clm"
        assert tags["size"] == "d32x2"
        assert tags["stackwise.version"] == stackwise.__version__
        assert len(tags["config_hash"]) == 16
        assert params["grid.mode"] == mode
        assert params["training.training_architecture"] == mode
        assert params["model.d_model"] == "32"
        assert params["model.vocab_size"] == "260"  # resolved from the byte tokenizer
        assert params["training.budget.steps"] == "16"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "stage_plan.json"} <= artifacts
        local = client.download_artifacts(run.info.run_id, "config.yaml")
        config = StackWiseConfig.from_yaml(local)
        # The identity: config, device type and the built-in corpus's content.
        assert tags["stackwise.device"] == "cpu"
        assert run_identity(config, "cpu", data_fingerprint(config.data)) == tags["config_hash"]
        assert tags["stackwise.data_fingerprint"] == data_fingerprint(config.data)


def test_step_metrics_and_summaries(
    tracked: dict[str, Any],
    point_runs: Callable[[Any, str], list[Any]],
    assert_each_step_logged_once: Callable[[Any, str], None],
) -> None:
    client, experiment_id = tracked["client"], tracked["experiment_id"]
    for run in point_runs(client, experiment_id):
        run_id, metrics = run.info.run_id, run.data.metrics
        assert_each_step_logged_once(client, run_id)
        loss = client.get_metric_history(run_id, "train/loss")
        assert [m.step for m in sorted(loss, key=lambda m: m.step)] == [4, 8, 12, 16]
        tokens = {m.step: m.value for m in client.get_metric_history(run_id, "train/tokens")}
        assert tokens[16] == 16 * 4 * 32
        for key in (
            "train/lr",
            "train/tokens_per_s",
            "val/loss",
            "val/perplexity",
            "stage/index",
            "stage/peak_memory_bytes",
            "stage/flops",
            "final_val_loss",
            "final_val_perplexity",
            "tokens_per_s",
            "peak_memory_bytes",
            "flops",
            "wall_time_s",
            "parameters",
        ):
            assert key in metrics, key
        stages = client.get_metric_history(run_id, "stage/index")
        if run.data.tags["training_architecture"] == "stackwise":
            assert sorted((m.step, m.value) for m in stages) == [(0, 0.0), (8, 1.0)]
            assert "train/loss/stack_0" in metrics and "train/loss/stack_1" in metrics
        else:
            assert [(m.step, m.value) for m in stages] == [(0, 0.0)]
        assert metrics["final_val_loss"] > 0
        # Headline results under the names `compare` shows (memory in MiB), logged once.
        assert metrics["val_loss"] == metrics["final_val_loss"]
        assert metrics["training_memory_mb"] * 2**20 == pytest.approx(
            metrics["training_memory_bytes"]
        )
        assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [16]


@pytest.mark.filterwarnings("ignore::UserWarning")  # MLflow's pyfunc loader nags about type hints
def test_logged_model_loads_by_run_id(
    tracked: dict[str, Any], point_runs: Callable[[Any, str], list[Any]]
) -> None:
    import mlflow

    import stackwise
    from stackwise.tracking.models import _model_of_run

    client, experiment_id = tracked["client"], tracked["experiment_id"]
    run = point_runs(client, experiment_id)[0]
    rack = stackwise.load_rack(run.info.run_id, tracking_uri=tracked["uri"])
    assert rack.get_parameter_count() == int(run.data.metrics["parameters"])
    input_ids = torch.randint(
        0, rack.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        logits = rack(input_ids)
    assert logits.shape == (2, 16, rack.vocab_size)
    # The pyfunc model (MLflow's own loading path, signature included) gives the same logits.
    model = _model_of_run(client, run.info.run_id)
    # Named by its run, carrying the run's final results (not its first step's).
    assert model.name == run.info.run_name
    linked = {m.key: m.value for m in model.metrics}
    assert linked["val_loss"] == run.data.metrics["final_val_loss"]
    assert {m.step for m in model.metrics} == {16}
    mlflow.set_tracking_uri(tracked["uri"])
    served = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    assert served.metadata.get_input_schema().inputs[0].name == "input_ids"
    assert torch.equal(torch.from_numpy(served.predict(input_ids.numpy())), logits)


# --------------------------------------------------------------------------------------------
# model round trip with the trained rack in hand
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tie_embeddings", "head", "tied_after"),
    [(True, "untie", False), (True, "frozen", True), (False, "untie", False)],
)
def test_log_rack_round_trip_identical_logits(
    tmp_path: Path,
    tie_embeddings: bool,
    head: str,
    tied_after: bool,
    tiny_training: Callable[..., dict[str, Any]],
) -> None:
    from stackwise.model.architecture import create_rack_from_config
    from stackwise.tracking.models import load_rack, log_rack
    from stackwise.tracking.store import get_or_create_experiment, open_client
    from stackwise.training.architecture_trainer import ArchitectureTrainer

    config = StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": 32,
                "n_heads": 4,
                "n_kv_heads": 2,
                "attention_type": "gqa",
                "tie_embeddings": tie_embeddings,
                "architecture": {"n_stacks": 2, "blocks_per_stack": 1},
            },
            "training": {
                **tiny_training(6),
                "training_architecture": "blockwise",
                "depthwise": {"head": head},
            },
        }
    )
    rack = create_rack_from_config(config)
    batches = [
        torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    ArchitectureTrainer(config).train_architecture(rack, batches)
    rack.eval()

    uri = default_tracking_uri(tmp_path)
    client = open_client(uri)
    experiment_id = get_or_create_experiment(client, uri, "models")
    run_id = client.create_run(experiment_id).info.run_id
    log_rack(rack, run_id, experiment_id, uri)
    loaded = load_rack(run_id, tracking_uri=uri)
    probe = torch.randint(0, 260, (3, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(probe), rack(probe))
    assert loaded.spec() == rack.spec()
    # A depth-wise run unties a tied head unless told to keep it frozen; the model says so.
    assert (rack.lm_head.weight is rack.token_embedding.weight) == tied_after
    assert (loaded.lm_head.weight is loaded.token_embedding.weight) == tied_after


def test_load_rack_without_model_is_an_error(tmp_path: Path) -> None:
    from stackwise.tracking.models import load_rack
    from stackwise.tracking.store import get_or_create_experiment, open_client

    uri = default_tracking_uri(tmp_path)
    client = open_client(uri)
    run_id = client.create_run(get_or_create_experiment(client, uri, "empty")).info.run_id
    with pytest.raises(LookupError, match="no logged rack model"):
        load_rack(run_id, tracking_uri=uri)


# --------------------------------------------------------------------------------------------
# the logging callback on its own (a real SQLite store, no training)
# --------------------------------------------------------------------------------------------


def _stage(index: int, steps: int) -> Any:
    from stackwise.training.callbacks import StageInfo

    return StageInfo(index, f"stack_{index}", "stack", (index, index + 1), steps, 100, 2)


def test_logger_records_each_step_once_also_after_resume(
    tmp_path: Path, assert_each_step_logged_once: Callable[[Any, str], None]
) -> None:
    from stackwise.tracking.logger import MlflowLogger
    from stackwise.tracking.metric_writer import logged_steps
    from stackwise.tracking.store import get_or_create_experiment, open_client

    uri = default_tracking_uri(tmp_path)
    client = open_client(uri)
    run_id = client.create_run(get_or_create_experiment(client, uri, "logger")).info.run_id
    stages = [_stage(0, 8), _stage(1, 8)]

    # First attempt: killed at step 12, after its last checkpoint (step 8) and after the
    # background writer had already sent steps 10 and 12.
    first = MlflowLogger(client, run_id, tokens_per_step=10)
    first.on_train_start(stages)
    first.on_stage_start(stages[0], 0)
    for step in (2, 4, 6, 8):
        first.on_metrics({"train/loss": 3.0 - step / 10}, step)
    first.on_metrics({"val/loss": 2.5}, 8)  # evaluation at a logged step: no second train/tokens
    first.on_stage_start(stages[1], 8)
    for step in (10, 12):
        first.on_metrics({"train/loss": 3.0 - step / 10}, step)
    first.close()
    assert logged_steps(client, run_id)["train/loss"] == 12

    # The resumed attempt restarts stage 1 from the checkpoint at step 8 and replays 10, 12.
    resumed = MlflowLogger(
        client, run_id, tokens_per_step=10, already_logged=logged_steps(client, run_id)
    )
    resumed.on_train_start(stages)
    resumed.on_stage_start(stages[1], 9)  # mid-stage: not a stage boundary
    for step in (10, 12, 14, 16):
        resumed.on_metrics({"train/loss": 3.0 - step / 10}, step)
    resumed.close()

    assert_each_step_logged_once(client, run_id)
    loss = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert loss == [2, 4, 6, 8, 10, 12, 14, 16]
    tokens = {m.step: m.value for m in client.get_metric_history(run_id, "train/tokens")}
    assert tokens == {step: step * 10.0 for step in loss}
    boundaries = client.get_metric_history(run_id, "stage/index")
    assert sorted((m.step, m.value) for m in boundaries) == [(0, 0.0), (8, 1.0)]


def test_progress_in_a_log_reports_each_stage_as_a_line() -> None:
    """CI logs and pipes get no redrawn bars; every finished stage still shows as one line."""
    import io

    from rich.console import Console

    from stackwise.tracking.progress import GridProgress
    from stackwise.training.callbacks import StageResult

    result = StageResult(_stage(1, 8), 8, 2560, 2.5, 2.25, 9.49, 1.0, 2560.0, 1 << 20, 1e9, None)
    for terminal in (False, True):
        out = io.StringIO()
        console = Console(file=out, force_terminal=terminal, width=120)
        with GridProgress(1, console=console) as progress:
            run = progress.start_run("mode=stackwise")
            run.on_stage_end(result, 16)
            progress.run_done()
        shown = "mode=stackwise: stage 2/2 stack_1 done at step 16: train loss 2.5000, val loss "
        assert (shown in out.getvalue()) != terminal, out.getvalue()
    quiet = io.StringIO()
    with GridProgress(1, quiet=True, console=Console(file=quiet)) as progress:
        progress.start_run("mode=stackwise").on_stage_end(result, 16)
    assert quiet.getvalue() == ""


def test_params_leave_out_the_settings_a_run_does_not_use() -> None:
    from stackwise.config.base import StackWiseConfig
    from stackwise.tracking.logger import run_params

    def sections(params: dict[str, str]) -> set[str]:
        return {".".join(key.split(".")[:2]) for key in params}

    plain = run_params(
        StackWiseConfig.from_dict({"training": {"training_architecture": "rackwise"}}), {}
    )
    assert not sections(plain) & {
        "model.mla",
        "model.kernel",
        "training.depthwise",
        "training.growth",
        "training.fusion",
    }
    assert plain["model.attention_type"] == "mha" and "training.optimizer.lr" in plain
    kernel = StackWiseConfig.from_dict(
        {
            "model": {"attention_type": "kernel"},
            "training": {"training_architecture": "stackwise"},
        }
    )
    used = sections(run_params(kernel, {"mode": "stackwise"}))
    assert {"model.kernel", "training.depthwise", "grid.mode"} <= used
    assert not used & {"model.mla", "training.growth", "training.fusion"}


def test_a_point_run_records_its_data_as_a_dataset_input(
    tracked: dict[str, Any], point_runs: Callable[[Any, str], list[Any]]
) -> None:
    client = tracked["client"]
    for run in point_runs(client, tracked["experiment_id"]):
        (found,) = run.inputs.dataset_inputs
        fingerprint = run.data.tags["stackwise.data_fingerprint"]
        assert found.dataset.digest == fingerprint[:36]
        assert found.dataset.name == "builtin corpus"
        assert json.loads(found.dataset.profile)["train_tokens"] > 0
        assert [(t.key, t.value) for t in found.tags] == [("mlflow.data.context", "training")]
