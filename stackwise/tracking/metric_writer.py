"""Sending a run's step metrics to MLflow from a background thread, and riding out a tracking
server that stops answering.

`MetricWriter` takes metrics from the training thread (appends under a lock) and sends them with
`MlflowClient.log_batch`. While the store takes nothing it holds them (at most
`MAX_BUFFERED_METRICS`); a checkpoint taken meanwhile saves them beside itself
(`UNSENT_METRICS_FILE`), and a resumed run sends what the store lacks of them first
(`send_unsent`, which asks the store for `logged_steps`). After ``tracking.server_wait_minutes``
without an answer the run stops as `TrackingUnavailable`.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stackwise.tracking.store import TrackingUnavailable, retry_locked, unreachable_reason

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

# MLflow's limit (mlflow.utils.validation): 1000 metrics per log_batch request.
METRICS_PER_BATCH = 1000

# A tracking server that stops answering (see `MetricWriter`).
DEFAULT_SERVER_WAIT_S = 300.0  # `tracking.server_wait_minutes`' default
MAX_BUFFERED_METRICS = 100_000  # held in memory at most: about 18 MB (180 bytes a metric)
STALL_S = 5.0  # no metric taken for this long while some wait: an outage
RETRY_DELAY_S = 2.0  # between requests the server did not take (each retried by MLflow first)
UNSENT_METRICS_FILE = "unsent-metrics.jsonl"  # beside a run's checkpoints


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
