"""A real `mlflow server` that goes away while `stackwise run` trains against it.

A team shares results through a tracking server; a restart, a crash or a network cut must not
cost a run its metrics or its training. The server here is a real `mlflow server` on 127.0.0.1
(SQLite backend and served artifacts in a temporary folder). Its going away is either the server
itself killed and started again on the same port and store (slow: each start of the server is
many seconds), or, for the quick tests, a TCP relay in front of it closed and opened again: to
the client both look the same (connections refused, open ones cut).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

LOG_EVERY = 10
# A tiny rack trains about 50 steps a second here: long enough that the server goes away
# mid-run. What a logged step records (loss, lr, rate, tokens, FLOPs, stage, per-stage loss,
# grad norm) is about ten metrics.
TRAINING = {
    "training_architecture": "rackwise",
    "batch_size": 2,
    "seq_len": 16,
    "log_every_steps": LOG_EVERY,
    "device": "cpu",
    "eval": {"batches": 1, "every_steps": 100},
    "checkpoint": {"every_steps": 50},
}
SERVER_START_S = 180  # an `mlflow server` starts in 15-30 s on a busy two-core machine


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(url: str) -> bool:
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/experiments/search",
        data=b'{"max_results": 1}',
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class MlflowServer:
    """`mlflow server` on 127.0.0.1:`port` with its SQLite store and artifacts in `folder`."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server (on the same port and store every time); returns at once."""
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{self.folder / 'mlflow.db'}",
                    "--serve-artifacts",
                    "--artifacts-destination",
                    str(self.folder / "artifacts"),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its uvicorn worker dies with it
            )

    def wait_ready(self, timeout: float = SERVER_START_S) -> None:
        deadline = time.monotonic() + timeout
        while not _answers(self.url):
            assert self.process is not None and self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, f"no answer in {timeout} s:\n{self.log()}"
            time.sleep(0.2)

    def kill(self) -> None:
        """The server dies (SIGKILL to it and its worker), as in a crash or a lost machine."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


class Relay:
    """A TCP relay on 127.0.0.1:`port` to the server. `close` closes it and every connection
    through it (to the client the server is gone: refused connections, cut ones); `open` opens
    it again on the same port. `drop_answers`: cut that many connections at the server's next
    answers instead of passing them on (the server did the work, the client never hears)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.drop_answers = 0
        self.dropped = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _shut(listener)
        with self._lock:
            connections, self._open = self._open, set()
        for connection in connections:
            _shut(connection)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=10)
                server.settimeout(None)
            except OSError:
                _shut(client)
                continue
            with self._lock:
                self._open |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            # A socket closed under the pump (the relay shut, the peer gone) ends it.
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    if answers and self._drop():
                        break
                    sink.sendall(data)
        finally:
            _shut(source)
            _shut(sink)

    def _drop(self) -> bool:
        with self._lock:
            if self.drop_answers <= 0:
                return False
            self.drop_answers -= 1
            self.dropped += 1
            return True


def _shut(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    connection.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One `mlflow server` for the quick tests of this module (each puts its own relay in
    front of it)."""
    served = MlflowServer(tmp_path_factory.mktemp("server"))
    served.start()
    try:
        served.wait_ready()
        yield served
    finally:
        served.kill()


@pytest.fixture
def relay(server: MlflowServer) -> Iterator[Relay]:
    opened = Relay(server.port)
    opened.open()
    try:
        yield opened
    finally:
        opened.close()


Helper = Callable[..., Any]


@pytest.fixture
def launched() -> Iterator[list[subprocess.Popen[str]]]:
    """The `stackwise run` processes a test starts; any still running at its end is killed."""
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _experiment(
    folder: Path, write_experiment: Helper, name: str, steps: int, **tracking: Any
) -> Path:
    return write_experiment(
        folder,
        name,
        training={**TRAINING, "budget": {"steps": steps}},
        data={"max_tokens": 20000},
        tracking={"log_model": False, **tracking},
    )


def _point_run(client: Any, experiment: str) -> Any | None:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id], filter_string="tags.`stackwise.role` = 'point'"
    )
    return runs[0] if runs else None


def _logged_steps(client: Any, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run_id, key))


def _start_and_wait_for_metrics(
    folder: Path,
    path: Path,
    url: str,
    server_url: str,
    launched: list[subprocess.Popen[str]],
    cli_command: Helper,
    cli_env: Helper,
    **env: str,
) -> tuple[subprocess.Popen[str], Any, str]:
    """`stackwise run` against `url` (with `env` added to its environment), once it has stored
    a few logged steps (seen on the server itself): (process, its point run, its output
    file)."""
    from mlflow import MlflowClient

    output = folder / "run.out"
    process = subprocess.Popen(
        cli_command("run", str(path), "--tracking-uri", url),
        cwd=folder,
        env={**cli_env(folder), **env},
        stdout=open(output, "w"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
        text=True,
    )
    launched.append(process)
    direct = MlflowClient(tracking_uri=server_url)
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, output.read_text()
        assert time.monotonic() < deadline, output.read_text()
        run = _point_run(direct, path.stem)
        if run is not None and len(_logged_steps(direct, run.info.run_id)) >= 2:
            return process, run, str(output)
        time.sleep(0.2)


def _check_complete(
    client: Any, run_id: str, steps: int, assert_each_step_logged_once: Helper
) -> None:
    """The run FINISHED with every logged step of every metric exactly once."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert_each_step_logged_once(client, run_id)
    expected = list(range(LOG_EVERY, steps + 1, LOG_EVERY))
    for key in ("train/loss", "train/lr", "train/tokens"):
        assert _logged_steps(client, run_id, key) == expected, key
    assert _logged_steps(client, run_id, "val/loss") == list(range(100, steps + 1, 100))
    assert run.data.metrics["total_steps"] == steps


def _outage_report(output: str) -> dict[str, float]:
    """The numbers of the writer's 'took metrics again' line."""
    found = re.search(
        r"took metrics again after ([\d.]+) s: (\d+) metric batches \((\d+) metrics, buffer "
        r"cap (\d+)\) were held and sent in (\d+) request\(s\); training paused ([\d.]+) s",
        " ".join(output.split()),
    )
    assert found is not None, output
    names = ("down_s", "batches", "metrics", "cap", "requests", "paused_s")
    return dict(zip(names, map(float, found.groups()), strict=True))


def _ride_out(
    tmp_path: Path,
    url: str,
    server_url: str,
    go_away: Callable[[], None],
    come_back: Callable[[], None],
    outage_s: float,
    steps: int,
    launched: list[subprocess.Popen[str]],
    write_experiment: Helper,
    cli_command: Helper,
    cli_env: Helper,
    assert_each_step_logged_once: Helper,
    **env: str,
) -> dict[str, float]:
    """A run against `url` (`env` added to its environment) whose server goes away for
    `outage_s` seconds mid-run: it finishes, every step stored once; returns what it reported
    of the outage."""
    from mlflow import MlflowClient

    path = _experiment(tmp_path, write_experiment, "outage", steps)
    process, run, output = _start_and_wait_for_metrics(
        tmp_path, path, url, server_url, launched, cli_command, cli_env, **env
    )
    go_away()
    went = time.monotonic()
    time.sleep(outage_s)
    assert process.poll() is None, Path(output).read_text()  # still training, or waiting
    come_back()
    back = time.monotonic()
    process.wait(timeout=300)
    text = Path(output).read_text()
    assert process.returncode == 0, text
    _check_complete(
        MlflowClient(tracking_uri=server_url), run.info.run_id, steps, assert_each_step_logged_once
    )
    report = _outage_report(text)
    report["outage_s"] = back - went
    assert "has taken no metrics for" in text, text
    assert report["cap"] == 100_000 and 0 < report["metrics"] <= report["cap"], report
    print(f"\noutage report: {report}")
    return report


def test_a_run_rides_out_a_server_that_goes_away(
    tmp_path: Path,
    server: MlflowServer,
    relay: Relay,
    launched: list[subprocess.Popen[str]],
    write_experiment: Helper,
    cli_command: Helper,
    cli_env: Helper,
    assert_each_step_logged_once: Helper,
) -> None:
    """The server's connections go away for 5 s (more than two logging intervals) after some
    steps were stored, longer than MLflow's own retries last here (one retry: the request
    fails at once): training goes on, the metrics wait in memory and are sent again once it
    answers, each step exactly once, and the run ends FINISHED."""
    report = _ride_out(
        tmp_path,
        relay.url,
        server.url,
        relay.close,
        relay.open,
        5,
        300,
        launched,
        write_experiment,
        cli_command,
        cli_env,
        assert_each_step_logged_once,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
    )
    assert report["down_s"] >= 5 and report["batches"] >= 1, report


@pytest.mark.slow
def test_a_run_rides_out_a_server_restart(
    tmp_path: Path,
    launched: list[subprocess.Popen[str]],
    write_experiment: Helper,
    cli_command: Helper,
    cli_env: Helper,
    assert_each_step_logged_once: Helper,
) -> None:
    """The `mlflow server` itself is killed mid-run and started again on the same port and
    store (down for as long as it takes to start: many logging intervals), with MLflow's
    client retrying as it does by default."""
    served = MlflowServer(tmp_path / "server")
    served.start()
    try:
        served.wait_ready()

        def restart() -> None:
            served.start()
            served.wait_ready()

        report = _ride_out(
            tmp_path,
            served.url,
            served.url,
            served.kill,
            restart,
            0,
            600,
            launched,
            write_experiment,
            cli_command,
            cli_env,
            assert_each_step_logged_once,
        )
        assert report["batches"] >= 1, report
    finally:
        served.kill()


def test_a_server_gone_past_the_limit_stops_the_run_and_a_rerun_resumes(
    tmp_path: Path,
    server: MlflowServer,
    relay: Relay,
    launched: list[subprocess.Popen[str]],
    write_experiment: Helper,
    cli_command: Helper,
    cli_env: Helper,
    run_cli: Helper,
    assert_each_step_logged_once: Helper,
) -> None:
    """With `tracking.server_wait_minutes: 0.05`, a server gone for good stops the run within
    seconds: a checkpoint, the unsent metrics beside it, one error line, exit 75. The same
    command once the server is back resumes the same run to FINISHED, each step once."""
    from mlflow import MlflowClient

    path = _experiment(tmp_path, write_experiment, "limit", 300, server_wait_minutes=0.05)
    process, run, output = _start_and_wait_for_metrics(
        tmp_path, path, relay.url, server.url, launched, cli_command, cli_env
    )
    relay.close()
    went = time.monotonic()
    process.wait(timeout=120)
    stopped_after = time.monotonic() - went
    text = Path(output).read_text()
    assert process.returncode == 75, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert "has taken no metrics for" in errors[0], text
    assert "(tracking.server_wait_minutes: 0.05)" in errors[0], text
    assert "stopped with a checkpoint in" in errors[0], text
    assert "run the same command again" in errors[0], text
    assert "Traceback" not in text, text
    assert 3 <= stopped_after < 60, stopped_after
    checkpoints = list((tmp_path / "mlruns" / "remote").glob("*/checkpoints/limit/*/latest"))
    assert len(checkpoints) == 1, text

    relay.open()
    again = run_cli(tmp_path, "run", str(path), "--tracking-uri", relay.url)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming" in again.stdout, again.stdout
    spilled = re.search(r"and (\d+) unsent metrics beside it", errors[0])
    resent = re.search(r"sent (\d+) metrics the last attempt kept", again.stdout)
    assert spilled is not None and int(spilled.group(1)) > 0, errors[0]
    # The kept metrics are sent unless the server stored them already (a batch whose answer
    # was lost as the relay closed): then the rerun has nothing to send and says nothing.
    if resent is not None:
        assert 0 < int(resent.group(1)) <= int(spilled.group(1)), (errors[0], again.stdout)
    client = MlflowClient(tracking_uri=server.url)
    assert _point_run(client, "limit").info.run_id == run.info.run_id  # the same run, resumed
    _check_complete(client, run.info.run_id, 300, assert_each_step_logged_once)
    print(f"\nstopped {stopped_after:.1f} s after the server went away: {errors[0]}")


def test_a_batch_whose_answer_was_lost_is_stored_once(
    server: MlflowServer, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stores a batch but its answer never arrives (MLflow's own retries off, so
    the writer sends it again itself): the store keeps each step once."""
    from mlflow import MlflowClient

    from stackwise.tracking.metric_writer import MetricWriter

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    direct = MlflowClient(tracking_uri=server.url)
    experiment = direct.create_experiment(f"lost-answer-{os.getpid()}-{time.time_ns()}")
    run_id = direct.create_run(experiment).info.run_id
    relay.drop_answers = 2
    writer = MetricWriter(MlflowClient(tracking_uri=relay.url), run_id, flush_interval=0.2)
    for step in range(1, 31):
        writer.add_many({"loss": 1.0 / step, "lr": 0.01}, step)
        time.sleep(0.02)
    writer.close()
    assert relay.dropped == 2
    for key in ("loss", "lr"):
        assert _logged_steps(direct, run_id, key) == list(range(1, 31)), key


def test_buffer_is_bounded_and_the_writer_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that never answers: at most `max_buffered` metrics are held (training waits
    for room), after `server_wait` the writer gives up, and every metric added is in the
    spill file."""
    from mlflow import MlflowClient

    from stackwise.tracking.metric_writer import MetricWriter
    from stackwise.tracking.store import TrackingUnavailable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    spill = tmp_path / "unsent.jsonl"
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{_free_port()}")
    writer = MetricWriter(
        client, "0" * 32, flush_interval=0.1, server_wait=1.5, max_buffered=50, spill_path=spill
    )
    started = time.monotonic()
    held = []
    step = 0
    with pytest.raises(TrackingUnavailable, match="has taken no metrics for"):
        while True:
            step += 1
            writer.add_many({f"m{i}": float(step) for i in range(5)}, step)
            held.append(writer.unsent)
    gave_up = time.monotonic() - started
    assert max(held) <= 50, held
    assert 1.5 <= gave_up < 10, gave_up
    assert writer.abandoned
    writer.close()
    lines = spill.read_text().splitlines()
    assert len(lines) == writer.unsent == 5 * step  # nothing was stored, nothing dropped
    assert f'"step": {step}' in lines[-1]
