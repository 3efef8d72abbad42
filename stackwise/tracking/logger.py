"""Recording a training run in MLflow: params, tags, step metrics, and the resolved config.

`MlflowLogger` is a `TrainingCallback`. The trainer calls it on its own thread; it only appends
metrics to an in-memory buffer there. A background `MetricWriter` thread sends the buffer with
`MlflowClient.log_batch` (at most 1000 metrics per request, MLflow's limit) every couple of
seconds, so the training loop never waits on the store. The buffer is flushed synchronously at
every checkpoint: what a resumed run starts from is then also in the store. Metrics sent after
the last checkpoint of a killed run are in the store too; the resumed run replays those steps
exactly, and its logger (given `logged_steps` of the run) leaves them out instead of logging
them twice.

Params are the fully resolved config flattened to dotted keys (``training.optimizer.lr``), with
the grid axes added as ``grid.<axis>``, so MLflow's parallel-coordinates view can use them.

Where a grid point is recorded (`run_destination`): the MLflow experiment
``tracking.experiment_name``, else the experiment file's ``name``, in the store
`stackwise.tracking.store.resolve_tracking_uri` picks (flag > $MLFLOW_TRACKING_URI >
``tracking.uri`` > ./mlruns). `stackwise run`, its pre-run checks and `stackwise compare` all
ask this one function.
"""

from __future__ import annotations

import functools
import json
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from stackwise.tracking.store import resolve_tracking_uri, retry_locked
from stackwise.training.callbacks import StageInfo, StageResult, TrainingCallback, TrainingResults

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from stackwise.config.base import StackWiseConfig
    from stackwise.config.experiment import RunSpec

# MLflow's limits (mlflow.utils.validation): param values up to 6000 characters, tag values up
# to 8000, 100 params or tags and 1000 metrics per log_batch request.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

# Tag names StackWise writes on every run.
TAG_ROLE = "stackwise.role"  # "grid" (parent run of one `stackwise run` of a file) or "point"
TAG_CONFIG_HASH = "config_hash"
TAG_RUN_NAME = "stackwise.run_name"
TAG_FILE = "stackwise.experiment_file"
TAG_VERSION = "stackwise.version"
TAG_ERROR = "error"
TAG_GRID_PREFIX = "grid."
TAG_TUNE_PREFIX = "tune."  # a tuned setting's value (short name), `tune:` of the file
TAG_SEED = "stackwise.seed"  # the replicate seed, when the file lists `seeds`
TAG_POINT = "stackwise.point"  # the grid point: the grid coordinates only
TAG_PARENT = "mlflow.parentRunId"
TAG_GIT_COMMIT = "mlflow.source.git.commit"


class RunDestination(NamedTuple):
    """Where a grid point's run is recorded: an MLflow experiment in a tracking store."""

    experiment: str  # MLflow experiment name
    uri: str  # tracking URI, resolved (`stackwise.tracking.store.resolve_tracking_uri`)


def run_destination(spec: RunSpec, cli_uri: str | None = None) -> RunDestination:
    """The experiment and store grid point `spec` is recorded in, given the ``--tracking-uri``
    flag `cli_uri`: ``tracking.experiment_name`` or the file's ``name``; the flag, else
    $MLFLOW_TRACKING_URI, else ``tracking.uri``, else ./mlruns."""
    tracking = spec.config.tracking
    return RunDestination(
        tracking.experiment_name or spec.experiment_name,
        resolve_tracking_uri(cli_uri, tracking.uri),
    )


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def flatten_config(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> ``{"dotted.key": "value"}``.

    Lists of mappings (explicit stacks) are flattened by index (``model.stacks.0.n_blocks``);
    other lists become JSON. Non-strings are JSON too (``true``, ``null``, ``0.001``), values
    are cut to MLflow's 6000-character limit.
    """
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for index, item in enumerate(value):
                flat.update(flatten_config(item, f"{name}.{index}."))
        else:
            flat[name] = _param_value(value)
    return flat


def run_params(config: StackWiseConfig, coordinates: Mapping[str, str]) -> dict[str, str]:
    """Params of a grid point: the flattened resolved config plus ``grid.<axis>``."""
    params = flatten_config(config.to_dict())
    params.update({f"{TAG_GRID_PREFIX}{axis}": _param_value(v) for axis, v in coordinates.items()})
    return params


def git_commit(directory: str | Path | None = None) -> str | None:
    """The commit checked out in `directory` (or the working directory), if it is a git repo."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def size_label(config: StackWiseConfig, coordinates: Mapping[str, str]) -> str:
    """The size preset of a run, or its dimensions when the grid has no size axis."""
    if "size" in coordinates:
        return coordinates["size"]
    return f"d{config.model.d_model}x{config.model.n_blocks}"


def run_tags(
    config: StackWiseConfig,
    coordinates: Mapping[str, str],
    config_hash: str,
    run_name: str,
    experiment_file: str | Path | None = None,
    tuned: Mapping[str, str] | None = None,
    seed: int | None = None,
    point: str | None = None,
) -> dict[str, str]:
    """Tags of a grid point run (the parent link is added by the runner): its grid coordinates
    (``grid.<axis>``), tuned values (``tune.<setting>``) and replicate seed."""
    from stackwise._version import __version__

    tags = {
        TAG_ROLE: "point",
        TAG_CONFIG_HASH: config_hash,
        TAG_RUN_NAME: run_name,
        TAG_VERSION: __version__,
        "training_architecture": config.training.mode_label,  # the user's word (layerwise)
        "objective": config.training.objective,
        "size": size_label(config, coordinates),
        "attention_type": config.model.attention_type,
        "attention_mode": config.model.attention_mode,
    }
    if config.training.training_architecture == "progressive":
        growth = config.training.growth
        tags.update({"growth_init": growth.init, "growth_schedule": growth.schedule})
    if config.training.is_depthwise:
        depthwise = config.training.depthwise
        tags.update(
            {
                "depthwise_head": depthwise.head,
                "depthwise_init": depthwise.init,
                "depthwise_data": depthwise.data,
            }
        )
    tags.update({f"{TAG_GRID_PREFIX}{axis}": str(v) for axis, v in coordinates.items()})
    tags.update({f"{TAG_TUNE_PREFIX}{axis}": str(v) for axis, v in (tuned or {}).items()})
    if seed is not None:
        tags[TAG_SEED] = str(seed)
    if point is not None:
        tags[TAG_POINT] = point
    if experiment_file is not None:
        tags[TAG_FILE] = str(experiment_file)
    commit = git_commit()
    if commit is not None:
        tags[TAG_GIT_COMMIT] = commit
    return tags


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches of 100 (MLflow's per-request limit)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        chunk = items[start : start + PARAMS_PER_BATCH]
        retry_locked(functools.partial(client.log_batch, run_id, params=chunk), what="params")


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    """Set tags in batches of 100 (values cut to MLflow's 8000-character limit)."""
    from mlflow.entities import RunTag

    items = [
        RunTag(k, v if len(v) <= MAX_TAG_VALUE else v[: MAX_TAG_VALUE - 3] + "...")
        for k, v in tags.items()
    ]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        chunk = items[start : start + PARAMS_PER_BATCH]
        retry_locked(functools.partial(client.log_batch, run_id, tags=chunk), what="tags")


class MetricWriter:
    """Sends buffered metrics to one run from a background thread.

    `add` is cheap (a list append under a lock). The thread wakes every `flush_interval`
    seconds, or when the buffer holds a full batch, and logs what has gathered. `flush` waits
    until everything added so far is stored; `close` flushes and stops the thread. An error
    from the store is kept and raised by the next `flush`/`close`, so nothing is lost silently.
    """

    def __init__(self, client: MlflowClient, run_id: str, flush_interval: float = 2.0) -> None:
        self.client = client
        self.run_id = run_id
        self.flush_interval = flush_interval
        self._pending: list[Metric] = []
        self._added = 0
        self._stored = 0
        self._error: BaseException | None = None
        self._stop = False
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="stackwise-metrics", daemon=True)
        self._thread.start()

    def add(self, key: str, value: float, step: int, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        metric = Metric(key, float(value), timestamp_ms or int(time.time() * 1000), int(step))
        with self._lock:
            self._pending.append(metric)
            self._added += 1
            if len(self._pending) >= METRICS_PER_BATCH:
                self._lock.notify_all()

    def add_many(self, values: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in values.items():
            self.add(key, value, step, now)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._stop and len(self._pending) < METRICS_PER_BATCH:
                    self._lock.wait(timeout=self.flush_interval)
                batch, self._pending = self._pending, []
                stopping = self._stop
            if batch:
                try:
                    self._send(batch)
                except BaseException as error:  # kept for the caller; the thread must not die
                    with self._lock:
                        self._error = self._error or error
            with self._lock:
                self._stored += len(batch)
                self._lock.notify_all()
            if stopping:
                with self._lock:
                    if not self._pending:
                        return

    def _send(self, batch: list[Metric]) -> None:
        for start in range(0, len(batch), METRICS_PER_BATCH):
            chunk = batch[start : start + METRICS_PER_BATCH]
            retry_locked(
                functools.partial(self.client.log_batch, self.run_id, metrics=chunk),
                what="metrics",
            )

    def flush(self) -> None:
        """Block until every metric added so far has been sent."""
        with self._lock:
            target = self._added
            self._lock.notify_all()
            while self._stored < target and self._thread.is_alive():
                self._lock.wait(timeout=0.05)
                self._lock.notify_all()
            error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"could not log metrics to MLflow: {error}") from error

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join()
        if self._pending:  # only if the thread died; send what is left from here
            batch, self._pending = self._pending, []
            self._send(batch)
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"could not log metrics to MLflow: {error}") from error


class MlflowLogger(TrainingCallback):
    """Logs a training run's step metrics, stage boundaries and results to one MLflow run.

    Metric names: the trainer's own (``train/loss``, ``train/lr``, ``train/tokens_per_s``,
    ``val/loss``, ``val/perplexity`` …) as given, plus

    - ``train/loss/<stage>``: the train loss of each stage on its own curve,
    - ``train/tokens``: tokens processed so far (from the step, for loss-over-tokens plots),
    - ``stage/index`` at each stage start (stage boundaries), and at each stage end
      ``stage/val_loss``, ``stage/tokens_per_s``, ``stage/peak_memory_bytes``, ``stage/flops``,
      ``stage/wall_time_s``, ``stage/trainable_parameters``,
    - the final `TrainingResults.summary_metrics()` at the last step.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        tokens_per_step: int | None = None,
        flush_interval: float = 2.0,
        already_logged: Mapping[str, int] | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.tokens_per_step = tokens_per_step
        # metric key -> last step the run already has (a resumed run): those steps are skipped
        self.already_logged = dict(already_logged or {})
        self.writer = MetricWriter(client, run_id, flush_interval=flush_interval)
        self._stage: StageInfo | None = None
        self._stage_starts: dict[int, int] = {}  # stage index -> global step it begins at
        self._last_step = 0
        self._closed = False

    def on_train_start(self, stages: list[StageInfo]) -> None:
        start = 0
        for stage in sorted(stages, key=lambda s: s.index):
            self._stage_starts[stage.index] = start
            start += stage.steps
        plan = [
            {
                "index": s.index,
                "name": s.name,
                "kind": s.kind,
                "trainable_blocks": list(s.trainable_blocks),
                "steps": s.steps,
                "trainable_parameters": s.trainable_parameters,
            }
            for s in stages
        ]
        retry_locked(lambda: self.client.log_dict(self.run_id, {"stages": plan}, "stage_plan.json"))

    def on_stage_start(self, stage: StageInfo, step: int) -> None:
        self._stage = stage
        if self.already_logged and step != self._stage_starts.get(stage.index, step):
            # A run resumed in the middle of this stage: its boundary is already recorded.
            return
        self.log_metrics(
            {
                "stage/index": float(stage.index),
                "stage/trainable_parameters": float(stage.trainable_parameters),
            },
            step,
        )

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._last_step = step
        values = dict(metrics)
        if "train/loss" in metrics and self._stage is not None:
            values[f"train/loss/{self._stage.name}"] = metrics["train/loss"]
        # Only with the train metrics of a step: evaluation at the same step would repeat it.
        if (
            "train/loss" in metrics
            and "train/tokens" not in metrics
            and self.tokens_per_step is not None
        ):
            values["train/tokens"] = float(step * self.tokens_per_step)
        self.log_metrics(values, step)

    def on_stage_end(self, result: StageResult, step: int) -> None:
        self._last_step = step
        values = {
            "stage/train_loss": result.train_loss,
            "stage/val_loss": result.val_loss,
            "stage/val_perplexity": result.val_perplexity,
            "stage/tokens_per_s": result.tokens_per_s,
            "stage/peak_memory_bytes": float(result.peak_memory_bytes),
            "stage/flops": result.flops,
            "stage/wall_time_s": result.wall_time_s,
            "stage/mfu": result.mfu,
            # memory in parts, cache size and training time (see `TrainingResults.extra`)
            **{f"stage/{key}": value for key, value in result.extra.items()},
        }
        self.log_metrics(values, step)

    def on_before_checkpoint(self, step: int) -> None:
        # Everything up to the checkpoint must be in the store before the checkpoint exists:
        # a run killed right after it resumes from there and will not log those steps again.
        self.writer.flush()

    def on_train_end(self, results: TrainingResults) -> None:
        self.log_metrics(results.summary_metrics(), results.total_steps)
        self.writer.flush()

    def log_metrics(self, values: Mapping[str, float | None], step: int) -> None:
        """Queue metrics at `step`, leaving out missing values and steps the run already has."""
        new = {
            key: value
            for key, value in _present(values).items()
            if step > self.already_logged.get(key, -1)
        }
        if new:
            self.writer.add_many(new, step)

    def close(self) -> None:
        """Send everything still buffered and stop the writer thread (idempotent)."""
        if not self._closed:
            self._closed = True
            self.writer.close()


def logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """Metric key -> the last step run `run_id` has recorded (what a resumed run must skip)."""
    run = retry_locked(lambda: client.get_run(run_id))
    steps: dict[str, int] = {}
    for key in run.data.metrics:
        history = retry_locked(functools.partial(client.get_metric_history, run_id, key))
        if history:
            steps[key] = max(int(m.step) for m in history)
    return steps


def _present(values: Mapping[str, float | None]) -> dict[str, float]:
    """Drop missing values; MLflow stores NaN/inf, but a None has no meaning as a metric."""
    return {k: float(v) for k, v in values.items() if v is not None}
