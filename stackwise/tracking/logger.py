"""Recording a training run in MLflow: params, tags, step metrics, and the resolved config.

`MlflowLogger` is a `TrainingCallback`. The trainer calls it on its own thread; it only appends
metrics to an in-memory buffer there. A background `MetricWriter` thread sends the buffer with
`MlflowClient.log_batch` (at most 1000 metrics per request, MLflow's limit) every couple of
seconds, so the training loop never waits on the store. The buffer is flushed synchronously at
every checkpoint: what a resumed run starts from is then also in the store. Metrics sent after
the last checkpoint of a killed run are in the store too; the resumed run replays those steps
exactly, and its logger (given `logged_steps` of the run) leaves them out instead of logging
them twice.

A tracking server that stops answering does not stop training: the writer holds the metrics
(at most `MAX_BUFFERED_METRICS`) and sends them, unchanged, once it answers again. A checkpoint
taken meanwhile saves the unsent metrics beside itself (`UNSENT_METRICS_FILE`) instead of
waiting; a resumed run sends what the store lacks of them first (`send_unsent`). After
``tracking.server_wait_minutes`` without an answer the run stops as `TrackingUnavailable`.

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
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from stackwise.tracking.store import (
    TrackingUnavailable,
    resolve_tracking_uri,
    retry_locked,
    unreachable_reason,
)
from stackwise.training.callbacks import StageInfo, StageResult, TrainingCallback, TrainingResults

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from stackwise.config.base import DataConfig, StackWiseConfig
    from stackwise.config.experiment import RunSpec

# MLflow's limits (mlflow.utils.validation): param values up to 6000 characters, tag values up
# to 8000, 100 params or tags and 1000 metrics per log_batch request.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

# A tracking server that stops answering (see `MetricWriter`).
DEFAULT_SERVER_WAIT_S = 300.0  # `tracking.server_wait_minutes`' default
MAX_BUFFERED_METRICS = 100_000  # held in memory at most: about 18 MB (180 bytes a metric)
STALL_S = 5.0  # no metric taken for this long while some wait: an outage
RETRY_DELAY_S = 2.0  # between requests the server did not take (each retried by MLflow first)
UNSENT_METRICS_FILE = "unsent-metrics.jsonl"  # beside a run's checkpoints

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


@dataclass
class Outage:
    """A stretch of time in which the store accepted no metrics while some waited to be sent."""

    since: float  # time.monotonic() of the store's last progress before it
    paused_before: float  # seconds the training thread had waited on the store before it
    peak_metrics: int = 0  # metrics held at most (buffered, and the request in flight)
    peak_batches: int = 0  # `add_many` calls (a logged step each) held at most
    answered: float | None = None  # when the store took a request again
    backlog_end: int = 0  # the count of metrics added when it did: the backlog to deliver
    requests: int = 0  # requests that delivered the backlog
    seconds: float = 0.0  # how long the store took nothing (set when the outage ends)
    paused: float = 0.0  # how long training waited on the store meanwhile (set when reported)
    reported: bool = False


class MetricWriter:
    """Sends buffered metrics to one run from a background thread, and rides out a tracking
    server that stops answering.

    `add`/`add_many` are cheap (appends under a lock). The thread wakes every `flush_interval`
    seconds, or when the buffer holds a full batch, and sends what has gathered with
    `MlflowClient.log_batch` (MLflow's client retries each request itself). A batch the server
    could not take goes back to the front of the buffer and is sent again, the same metrics with
    the same timestamps: a request that reached the store although its answer was lost is
    stored once (MLflow's SQL store keeps one row per key, step, timestamp and value).

    While the store takes nothing, training goes on and metrics are held in memory, at most
    `max_buffered`: beyond that `add` waits (training pauses) for room. `flush` waits until
    everything added so far is stored; `flush(spill=True)` (a checkpoint's) stops waiting once
    the store has taken nothing for `STALL_S` seconds and saves the unsent metrics to
    `spill_path` instead, so the checkpoint never waits on a dead server and loses nothing. When
    the store has taken nothing for `server_wait` seconds, `add` and `flush` give up:
    `TrackingUnavailable` is raised, the writer stops sending, and what is unsent is saved to
    `spill_path` by the next `flush(spill=True)` or `close`. An error other than an unreachable
    server is kept and raised by the next `flush`/`close`, so nothing is lost silently.
    `outages` records each outage (duration, metrics and batches held, training paused).
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        flush_interval: float = 2.0,
        server_wait: float = DEFAULT_SERVER_WAIT_S,
        max_buffered: int = MAX_BUFFERED_METRICS,
        spill_path: Path | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.flush_interval = flush_interval
        self.server_wait = server_wait
        self.max_buffered = max(1, max_buffered)
        self.spill_path = spill_path
        self.notify = notify
        self.outages: list[Outage] = []
        self._pending: deque[Metric] = deque()
        self._in_flight: list[Metric] = []
        self._batch_ends: deque[int] = deque()  # `_added` after each add_many still unsent
        self._added = 0
        self._stored = 0
        self._progress_at = time.monotonic()  # the store's last progress (or first new metric)
        self._waited_at_progress = 0.0  # `_waited` then
        self._outage: Outage | None = None
        self._notices: list[str] = []
        self._waited = 0.0  # seconds the training thread has waited on the store
        self._error: BaseException | None = None
        self._urgent = False
        self._stop = False
        self._abandoned = False  # given up: nothing more is sent, the rest is spilled
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="stackwise-metrics", daemon=True)
        self._thread.start()

    @property
    def unsent(self) -> int:
        """Metrics added and not yet stored (buffered, or in a request without an answer)."""
        return self._added - self._stored

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    def add(self, key: str, value: float, step: int, timestamp_ms: int | None = None) -> None:
        self.add_many({key: value}, step, timestamp_ms)

    def add_many(
        self, values: Mapping[str, float], step: int, timestamp_ms: int | None = None
    ) -> None:
        """Queue metrics of one step; waits while the buffer is full. Raises
        `TrackingUnavailable` once the store has taken nothing for `server_wait` seconds (the
        metrics are kept for the spill file all the same)."""
        from mlflow.entities import Metric

        now_ms = timestamp_ms or int(time.time() * 1000)
        metrics = [Metric(key, float(value), now_ms, int(step)) for key, value in values.items()]
        if not metrics:
            return
        with self._lock:
            try:
                if not self._abandoned:
                    if self.unsent + len(metrics) > self.max_buffered:
                        self._wait_for_room(len(metrics))
                    self._watch(time.monotonic())
            finally:  # kept even when giving up: the spill file saves them for the rerun
                self._append(metrics)
        self._report()

    def _append(self, metrics: list[Metric]) -> None:
        """Buffer one step's metrics (under the lock)."""
        if self.unsent == 0:
            self._progress_at = time.monotonic()
            self._waited_at_progress = self._waited
        self._pending.extend(metrics)
        self._added += len(metrics)
        self._batch_ends.append(self._added)
        if self._outage is not None:
            self._outage.peak_metrics = max(self._outage.peak_metrics, self.unsent)
            self._outage.peak_batches = max(self._outage.peak_batches, len(self._batch_ends))
        if len(self._pending) >= METRICS_PER_BATCH:
            self._lock.notify_all()

    def _wait_for_room(self, count: int) -> None:
        """Training pauses: the buffer is full (called under the lock)."""
        started = time.monotonic()
        try:
            while self.unsent + count > self.max_buffered and not self._abandoned:
                self._watch(time.monotonic())
                self._lock.wait(timeout=0.05)
        finally:
            self._waited += time.monotonic() - started

    def _watch(self, now: float) -> None:
        """Notice an outage (the store took nothing for `STALL_S` s while metrics waited) and
        give up once it has lasted `server_wait` seconds (called under the lock)."""
        if self.unsent == 0 or self._abandoned:
            return
        idle = now - self._progress_at
        if self._outage is None and idle >= STALL_S:
            self._outage = Outage(self._progress_at, self._waited_at_progress)
            self._outage.peak_metrics = self.unsent
            self._outage.peak_batches = len(self._batch_ends)
            self._notices.append(
                f"the {self._store} has taken no metrics for {idle:.0f} s; "
                f"holding them in memory (at most {self.max_buffered}) while training goes "
                f"on, for up to {_duration(self.server_wait)}"
            )
        if idle >= self.server_wait:
            self._abandoned = True
            self._lock.notify_all()
            raise TrackingUnavailable(
                f"the {self._store} has taken no metrics for {idle:.0f} s "
                f"(tracking.server_wait_minutes: {self.server_wait / 60:g})"
            )

    @property
    def _store(self) -> str:
        uri = str(getattr(self.client, "tracking_uri", "") or "")
        return f"tracking server {uri}" if uri.startswith("http") else f"tracking store {uri}"

    def _report(self) -> None:
        """Print what the writer thread noticed (from the training thread, outside the lock)."""
        with self._lock:
            notices, self._notices = self._notices, []
            for outage in self.outages:
                if not outage.reported:
                    outage.reported = True
                    outage.paused = self._waited - outage.paused_before
                    notices.append(
                        f"the {self._store} took metrics again after "
                        f"{outage.seconds:.1f} s: {outage.peak_batches} metric batches "
                        f"({outage.peak_metrics} metrics, buffer cap {self.max_buffered}) were "
                        f"held and sent in {outage.requests} request(s); training paused "
                        f"{outage.paused:.1f} s"
                    )
        if self.notify is not None:
            for notice in notices:
                self.notify(notice)

    def _loop(self) -> None:
        retry_at = 0.0
        while True:
            with self._lock:
                batch = self._next_batch(retry_at)
                if batch is None:
                    return
                self._in_flight = batch
            try:
                retry_locked(
                    functools.partial(self.client.log_batch, self.run_id, metrics=batch),
                    what="metrics",
                )
            except Exception as error:  # kept or retried; the thread must not die
                with self._lock:
                    self._in_flight = []
                    if self._abandoned:
                        return
                    if unreachable_reason(error) is not None:
                        self._pending.extendleft(reversed(batch))  # same metrics, same order
                        retry_at = time.monotonic() + RETRY_DELAY_S
                        continue
                    self._error = self._error or error  # the server answered: no retry
                    self._delivered(len(batch))
                continue
            with self._lock:
                self._in_flight = []
                if self._abandoned:
                    return
                self._delivered(len(batch))

    def _next_batch(self, retry_at: float) -> list[Metric] | None:
        """The next request's metrics, when the interval is up, a batch is full or a flush asks
        (after a failed request, not before `retry_at`); None: stop (under the lock)."""
        while not self._abandoned:
            now = time.monotonic()
            if now < retry_at:
                self._lock.wait(timeout=retry_at - now)
                continue
            if not (self._stop or self._urgent or len(self._pending) >= METRICS_PER_BATCH):
                self._lock.wait(timeout=self.flush_interval)
                if self._abandoned:
                    break
            if self._pending:
                count = min(len(self._pending), METRICS_PER_BATCH)
                return [self._pending.popleft() for _ in range(count)]
            self._urgent = False
            if self._stop:
                break
        return None

    def _delivered(self, count: int) -> None:
        """The server took a request of `count` metrics (or refused it with an error, which is
        kept): progress, and maybe the end of an outage (under the lock)."""
        now = time.monotonic()
        self._stored += count
        while self._batch_ends and self._batch_ends[0] <= self._stored:
            self._batch_ends.popleft()
        self._progress_at = now
        self._waited_at_progress = self._waited
        outage = self._outage
        if outage is not None:
            if outage.answered is None:
                outage.answered = now
                outage.backlog_end = self._added
            outage.requests += 1
            if self._stored >= outage.backlog_end:
                outage.seconds = outage.answered - outage.since
                self.outages.append(outage)
                self._outage = None
        self._lock.notify_all()

    def flush(self, spill: bool = False) -> None:
        """Block until every metric added so far is stored. With `spill` (a checkpoint), stop
        waiting once the store has taken nothing for `STALL_S` seconds, and save the unsent
        metrics to `spill_path` instead (after giving up, at once)."""
        with self._lock:
            target = self._added
            self._urgent = True
            self._lock.notify_all()
            started = time.monotonic()
            try:
                while self._stored < target and self._thread.is_alive():
                    now = time.monotonic()
                    stalled = now - self._progress_at >= STALL_S
                    if self._abandoned or (spill and stalled and self.spill_path is not None):
                        self._spill()  # the checkpoint goes on without the store
                        break
                    self._watch(now)
                    self._lock.wait(timeout=0.05)
            finally:
                self._waited += time.monotonic() - started
            if self.unsent == 0 and self.spill_path is not None:
                self.spill_path.unlink(missing_ok=True)  # everything it held is stored now
            error, self._error = self._error, None
        self._report()
        if error is not None:
            raise RuntimeError(f"could not log metrics to MLflow: {error}") from error

    def _spill(self) -> None:
        """Save every unsent metric to `spill_path` (replacing it: the file always holds all that
        the store may lack), under the lock."""
        if self.spill_path is None or self.unsent == 0:
            return
        lines = [
            json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step})
            for m in (*self._in_flight, *self._pending)
        ]
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.spill_path.with_name(self.spill_path.name + ".tmp")
        temp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        os.replace(temp, self.spill_path)

    def close(self, wait: bool = True) -> None:
        """Send what is buffered and stop the thread. `wait`: wait for the store as `flush`
        does (giving up after `server_wait`); else only while it takes metrics, saving the rest
        to `spill_path` (on the way out of a failed or interrupted run). After giving up, what
        is unsent is saved to `spill_path` and nothing waits."""
        try:
            self.flush(spill=not wait)
        finally:
            with self._lock:
                self._stop = True
                if self.unsent and not self._abandoned:  # stopped waiting: spilled, sent no more
                    self._abandoned = True
                if self._abandoned:
                    self._spill()
                self._lock.notify_all()
            if not self._abandoned:
                self._thread.join()


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


def logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """Metric key -> the last step run `run_id` has recorded (what a resumed run must skip)."""
    run = retry_locked(lambda: client.get_run(run_id))
    steps: dict[str, int] = {}
    for key in run.data.metrics:
        history = retry_locked(functools.partial(client.get_metric_history, run_id, key))
        if history:
            steps[key] = max(int(m.step) for m in history)
    return steps


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def send_unsent(client: MlflowClient, run_id: str, path: Path) -> int:
    """Send the metrics a stopped run saved to `path` (`MetricWriter` spills them there) that
    run `run_id` does not have yet, then delete the file; how many were sent.

    The store is asked first (`logged_steps`): the file may hold a batch the server stored
    although its answer was lost. Metrics are sent in the order they were logged, so a key's
    metrics up to its last stored step are in the store and the later ones are not.
    """
    from mlflow.entities import Metric

    if not path.is_file():
        return 0
    saved = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    have = logged_steps(client, run_id)
    fresh = [
        Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"]))
        for m in saved
        if int(m["step"]) > have.get(m["key"], -1)
    ]
    for start in range(0, len(fresh), METRICS_PER_BATCH):
        chunk = fresh[start : start + METRICS_PER_BATCH]
        retry_locked(functools.partial(client.log_batch, run_id, metrics=chunk), what="metrics")
    path.unlink()
    return len(fresh)


def _present(values: Mapping[str, float | None]) -> dict[str, float]:
    """Drop missing values; MLflow stores NaN/inf, but a None has no meaning as a metric."""
    return {k: float(v) for k, v in values.items() if v is not None}
