"""Recording a training run in MLflow: params, tags, step metrics, and the resolved config.

`MlflowLogger` is a `TrainingCallback`. The trainer calls it on its own thread; it only appends
metrics to an in-memory buffer there. A background `MetricWriter`
(`stackwise.tracking.metric_writer`) sends the buffer with `MlflowClient.log_batch` every couple
of seconds, so the training loop never waits on the store, and rides out a tracking server that
stops answering. The buffer is flushed synchronously at every checkpoint: what a resumed run
starts from is then also in the store. Metrics sent after the last checkpoint of a killed run
are in the store too; the resumed run replays those steps exactly, and its logger (given
`logged_steps` of the run) leaves them out instead of logging them twice.

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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from stackwise.tracking.metric_writer import DEFAULT_SERVER_WAIT_S, MetricWriter
from stackwise.tracking.store import resolve_tracking_uri, retry_locked
from stackwise.training.callbacks import StageInfo, StageResult, TrainingCallback, TrainingResults

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from stackwise.config.base import DataConfig, StackWiseConfig
    from stackwise.config.experiment import RunSpec

# MLflow's limits (mlflow.utils.validation): param values up to 6000 characters, tag values up
# to 8000, 100 params or tags per log_batch request.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100


# Tag names StackWise writes on every run.
TAG_ROLE = "stackwise.role"  # "grid" (parent run of one `stackwise run` of a file) or "point"
TAG_CONFIG_HASH = "config_hash"
TAG_RUN_NAME = "stackwise.run_name"
TAG_FILE = "stackwise.experiment_file"
TAG_VERSION = "stackwise.version"
TAG_ERROR = "error"
TAG_OWNER = "stackwise.owner"  # host:pid of the process that runs (or last ran) it
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


def unused_sections(config: StackWiseConfig) -> tuple[str, ...]:
    """Config sections (dotted prefixes) that do not apply to this run: the mla and kernel
    options without such attention, depth-wise options of an end-to-end run, growth options
    outside progressive training, and a fusion phase that is off."""
    attentions = {spec.attention_type for spec in config.model.block_specs()}
    training = config.training
    unused = [f"model.{kind}." for kind in ("mla", "kernel") if kind not in attentions]
    if training.training_architecture == "rackwise":
        unused.append("training.depthwise.")
    if training.training_architecture != "progressive":
        unused.append("training.growth.")
    if not training.fusion.enabled:
        unused.append("training.fusion.")
    return tuple(unused)


def run_params(config: StackWiseConfig, coordinates: Mapping[str, str]) -> dict[str, str]:
    """Params of a grid point: the flattened resolved config — less the sections that do not
    apply to it (`unused_sections`; the whole config is the run's ``config.yaml``) — plus
    ``grid.<axis>``."""
    unused = unused_sections(config)
    params = {
        key: value
        for key, value in flatten_config(config.to_dict()).items()
        if not key.startswith(unused)
    }
    params.update({f"{TAG_GRID_PREFIX}{axis}": _param_value(v) for axis, v in coordinates.items()})
    return params


DATASET_DIGEST_LENGTH = 36  # what MLflow's store keeps of a dataset digest


def log_dataset(
    client: MlflowClient,
    run_id: str,
    data: DataConfig,
    fingerprint: str,
    counts: Mapping[str, int],
) -> None:
    """Record the run's data as an MLflow dataset input (the UI's *Dataset* column): named by its
    source, its digest the data fingerprint (its first `DATASET_DIGEST_LENGTH` characters; the
    whole fingerprint is the ``stackwise.data_fingerprint`` tag), its profile the token counts."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    if data.source in ("files", "prepared"):
        names = [Path(path).name for path in data.paths]
        name = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        source = json.dumps({"source": data.source, "paths": [str(p) for p in data.paths]})
    else:
        name, source = f"{data.source} corpus", json.dumps({"source": data.source})
    dataset = Dataset(
        name=name,
        digest=fingerprint[:DATASET_DIGEST_LENGTH],
        source_type="local" if data.source in ("files", "prepared") else "code",
        source=source,
        profile=json.dumps(dict(counts)),
    )
    training = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])
    retry_locked(lambda: client.log_inputs(run_id, datasets=[training]))


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

    A tracking server that stops answering is ridden out by its `MetricWriter` (`server_wait`
    seconds at most; `spill_path` keeps what a checkpoint could not send; `notify` gets a line
    when an outage starts and when it ends).
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        tokens_per_step: int | None = None,
        flush_interval: float = 2.0,
        already_logged: Mapping[str, int] | None = None,
        server_wait: float = DEFAULT_SERVER_WAIT_S,
        spill_path: Path | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.tokens_per_step = tokens_per_step
        # metric key -> last step the run already has (a resumed run): those steps are skipped
        self.already_logged = dict(already_logged or {})
        self.writer = MetricWriter(
            client,
            run_id,
            flush_interval=flush_interval,
            server_wait=server_wait,
            spill_path=spill_path,
            notify=notify,
        )
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
        # A server that takes nothing: saved beside the checkpoint instead (`send_unsent`).
        self.writer.flush(spill=True)

    def on_train_end(self, results: TrainingResults) -> None:
        summary = results.summary_metrics()
        self.log_metrics({**summary, **headline_metrics(summary)}, results.total_steps)
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

    def close(self, wait: bool = True) -> None:
        """Send everything still buffered and stop the writer thread (idempotent); see
        `MetricWriter.close` for `wait`."""
        if not self._closed:
            self._closed = True
            self.writer.close(wait=wait)


# The results a reader looks for first, under the short names `stackwise compare` shows them by
# (no slash, so the UI lists them apart from the per-step series): summary metric -> name.
HEADLINE_METRICS: dict[str, str] = {
    "final_val_loss": "val_loss",
    "final_test_loss": "test_loss",
    "training_memory_bytes": "training_memory_mb",
}


def headline_metrics(summary: Mapping[str, float]) -> dict[str, float]:
    """`HEADLINE_METRICS` of a run's summary metrics (memory in MiB, as `compare` shows it);
    ``flops`` and ``tokens_seen`` are already logged under their short names."""
    found = {}
    for key, name in HEADLINE_METRICS.items():
        if key in summary:
            found[name] = summary[key] / 2**20 if name.endswith("_mb") else summary[key]
    return found


def _present(values: Mapping[str, float | None]) -> dict[str, float]:
    """Drop missing values; MLflow stores NaN/inf, but a None has no meaning as a metric."""
    return {k: float(v) for k, v in values.items() if v is not None}
