"""What clusters do to runs, through the real CLI: SIGKILL, SIGTERM and SIGHUP mid-point and
reruns, run identity across folders and data, stores that share a folder, and stores that are
not what they claim (an HTTP server that is not MLflow, one that never answers, a database URI
without its driver).

Every store starts as a copy of one empty MLflow database made once per session (creating the
tables takes MLflow seconds), and every rack is tiny: a test costs its process starts.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stackwise.config.experiment import expand_grid, load_experiment
from stackwise.runner import point_of
from stackwise.tracking.store import checkpoint_dir, local_root
from stackwise.training.checkpoint import read_checkpoint_metadata

LOG_EVERY = 10


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite database with its tables created (copied by the tests that need one)."""
    from mlflow import MlflowClient

    database = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{database}").search_experiments(max_results=1)
    return database


def new_store(empty_store: Path, database: Path) -> str:
    database.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_store, database)
    return f"sqlite:///{database}"


# The rack and training of every experiment here: d_model 32, 2 blocks, seq_len 16, batch 2.
FAULTS_MODEL = {"d_model": 32, "n_heads": 2, "architecture": {"n_stacks": 1, "blocks_per_stack": 2}}
FAULTS_TRAINING = {
    "budget": {"steps": 60},
    "batch_size": 2,
    "seq_len": 16,
    "log_every_steps": LOG_EVERY,
    "device": "cpu",
    "eval": {"batches": 1},
    "checkpoint": {"every_steps": 50},
}


WriteFile = Callable[..., Path]


@pytest.fixture
def write_file(write_experiment: WriteFile) -> WriteFile:
    """`write_file(folder, name, grid=None, **data)`: a tiny experiment (`FAULTS_MODEL`,
    `FAULTS_TRAINING`, no model logged) in ``folder/<name>.yaml``; `data` adds data settings."""

    def write_file(
        folder: Path, name: str, grid: dict[str, list[Any]] | None = None, **data: Any
    ) -> Path:
        return write_experiment(
            folder,
            name,
            grid=grid,
            training=FAULTS_TRAINING,
            model=FAULTS_MODEL,
            data={"max_tokens": 20000, **data},
            tracking={"log_model": False},
        )

    return write_file


def _default_hangup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class Cli:
    """A command (`stackwise <args>`) as a background process whose output is collected as it
    comes."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.started = time.monotonic()
        self.ended = float("inf")  # when its output closed (it exited)
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Under `nohup` (a CI runner may be one) SIGHUP is ignored and a child inherits
            # that, so `stackwise run` would rightly keep ignoring it: start it as a terminal
            # would.
            preexec_fn=_default_hangup,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
        self.ended = time.monotonic()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, condition: Callable[[], object], timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"ended early:\n{self.finish()}"
            assert time.monotonic() < deadline, f"timed out:\n{self.output}"
            time.sleep(0.02)

    def finish(self, timeout: float = 240) -> str:
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.output

    def kill(self, sig: int) -> str:
        self.process.send_signal(sig)
        return self.finish()


Start = Callable[..., Cli]
Run = Callable[..., tuple[int, str]]
Helper = Callable[..., Any]


@pytest.fixture
def start(cli_command: Helper, cli_env: Helper) -> Start:
    """`start(cwd, *args)`: `stackwise <args>` started in `cwd` in the background (a `Cli`)."""

    def start(cwd: Path, *args: str) -> Cli:
        return Cli(cli_command(*args), cwd, cli_env(cwd))

    return start


@pytest.fixture
def run(start: Start) -> Run:
    """`run(cwd, *args)`: `stackwise <args>` in `cwd` to its end: (exit code, output)."""

    def run(cwd: Path, *args: str) -> tuple[int, str]:
        cli = start(cwd, *args)
        output = cli.finish()
        return cli.process.returncode, output

    return run


def client_of(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_runs(uri: str, name: str, role: str) -> list[Any]:
    client = client_of(uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    return list(
        client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`stackwise.role` = '{role}'"
        )
    )


def identities(path: Path, uri: str) -> list[str]:
    return [point_of(spec, uri).identity for spec in expand_grid(load_experiment(path))]


# --------------------------------------------------------------------------------------------
# signals and orphans
# --------------------------------------------------------------------------------------------


# Points that signals must reach mid-way run 1,000 steps: several seconds after their first
# checkpoint (step 50) even on an idle machine, so the signal never arrives after the end.


def test_sigkill_then_sigterm_then_rerun_leaves_one_finished_run_per_point(
    tmp_path: Path,
    empty_store: Path,
    write_file: WriteFile,
    start: Start,
    run: Run,
    assert_each_step_logged_once: Helper,
) -> None:
    """kill -9 before the point's first checkpoint, a rerun adopts the orphan and restarts in
    it; SIGTERM checkpoints, marks it KILLED and exits 143; the next rerun resumes: every point
    ends with exactly one run, FINISHED, its curve logged once, and no run is left RUNNING."""
    uri = new_store(empty_store, tmp_path / "store" / "mlflow.db")
    path = write_file(tmp_path, "faults", grid={"training.budget.steps": [1000, 20]})
    long_id, short_id = identities(path, uri)
    folder = checkpoint_dir(uri, "faults", long_id)
    args = ("run", str(path), "--tracking-uri", uri)

    # 1. SIGKILL mid-point. Its checkpoint is removed: the state a kill leaves before the
    # first checkpoint (a RUNNING run, some metrics, nothing to resume from).
    first = start(tmp_path, *args)
    first.wait_for(lambda: read_checkpoint_metadata(folder))
    run_id = read_checkpoint_metadata(folder)["mlflow_run_id"]  # type: ignore[index]
    first.kill(signal.SIGKILL)
    shutil.rmtree(folder)
    client = client_of(uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert client.get_metric_history(run_id, "train/loss")

    # 2. A rerun adopts the orphan (no second run), then gets SIGTERM mid-point.
    second = start(tmp_path, *args)
    second.wait_for(lambda: f"restarting (no checkpoint) (run {run_id})" in second.output)
    second.wait_for(lambda: read_checkpoint_metadata(folder))
    output = second.kill(signal.SIGTERM)
    assert second.process.returncode == 143, output
    assert "Traceback" not in output and "SIGTERM" in output
    assert client.get_run(run_id).info.status == "KILLED"
    assert (read_checkpoint_metadata(folder) or {}).get("mlflow_run_id") == run_id
    parents = experiment_runs(uri, "faults", "grid")
    assert sorted(p.info.status for p in parents) == ["KILLED", "KILLED"]  # both closed

    # 3. The next rerun resumes from the SIGTERM checkpoint and finishes the grid.
    code, output = run(tmp_path, *args)
    assert code == 0, output
    assert f"resuming (run {run_id})" in output
    runs = experiment_runs(uri, "faults", "point")
    assert sorted((r.data.tags["config_hash"], r.info.status) for r in runs) == sorted(
        [(long_id, "FINISHED"), (short_id, "FINISHED")]
    )
    assert {r.info.run_id for r in runs if r.data.tags["config_hash"] == long_id} == {run_id}
    statuses = [r.info.status for r in client.search_runs([runs[0].info.experiment_id])]
    assert "RUNNING" not in statuses
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(LOG_EVERY, 1001, LOG_EVERY))
    assert_each_step_logged_once(client, run_id)
    assert not folder.exists()


def test_sighup_checkpoints_and_another_store_leaves_it_alone(
    tmp_path: Path, empty_store: Path, write_file: WriteFile, start: Start, run: Run
) -> None:
    """Two stores in one folder: a point interrupted (SIGHUP, exit 129) in a.db keeps its
    checkpoint in a.stackwise/ while the same point runs to the end in b.db; a.db then resumes
    its own checkpoint into its own run."""
    a_uri = new_store(empty_store, tmp_path / "stores" / "a.db")
    b_uri = new_store(empty_store, tmp_path / "stores" / "b.db")
    path = write_file(tmp_path, "stores", grid={"training.budget.steps": [1000]})
    (identity,) = identities(path, a_uri)
    assert identities(path, b_uri) == [identity]
    a_folder = checkpoint_dir(a_uri, "stores", identity)
    assert a_folder.is_relative_to(tmp_path / "stores" / "a.stackwise")

    interrupted = start(tmp_path, "run", str(path), "--tracking-uri", a_uri)
    interrupted.wait_for(lambda: read_checkpoint_metadata(a_folder))
    output = interrupted.kill(signal.SIGHUP)
    assert interrupted.process.returncode == 129, output
    metadata = read_checkpoint_metadata(a_folder)
    assert metadata is not None
    a_run = metadata["mlflow_run_id"]

    code, output = run(tmp_path, "run", str(path), "--tracking-uri", b_uri)
    assert code == 0 and "1 finished" in output, output
    assert read_checkpoint_metadata(a_folder) == metadata  # untouched by b.db's run
    assert not checkpoint_dir(b_uri, "stores", identity).exists()
    assert (tmp_path / "stores" / "b.stackwise" / "artifacts").is_dir()
    assert not (tmp_path / "stores" / "checkpoints").exists()

    code, output = run(tmp_path, "run", str(path), "--tracking-uri", a_uri)
    assert code == 0, output
    assert f"resuming (run {a_run})" in output
    (a_point,) = experiment_runs(a_uri, "stores", "point")
    assert (a_point.info.run_id, a_point.info.status) == (a_run, "FINISHED")


def test_checkpoint_under_another_device_name_restarts_inside_the_run(
    tmp_path: Path,
    empty_store: Path,
    write_file: WriteFile,
    start: Start,
    run: Run,
    assert_each_step_logged_once: Helper,
) -> None:
    """`device: cpu` then `device: auto` on a CPU-only machine is one run: its checkpoint (the
    trainer checks its exact config) is dropped and the point trains again inside that run."""
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("auto is not cpu here")
    uri = new_store(empty_store, tmp_path / "store" / "mlflow.db")
    path = write_file(tmp_path, "device", grid={"training.budget.steps": [1000]})
    (identity,) = identities(path, uri)
    folder = checkpoint_dir(uri, "device", identity)
    interrupted = start(tmp_path, "run", str(path), "--tracking-uri", uri)
    interrupted.wait_for(lambda: read_checkpoint_metadata(folder))
    run_id = read_checkpoint_metadata(folder)["mlflow_run_id"]  # type: ignore[index]
    output = interrupted.kill(signal.SIGTERM)
    assert interrupted.process.returncode == 143, output

    args = ("run", str(path), "--tracking-uri", uri, "--set", "training.device=auto")
    code, output = run(tmp_path, *args)
    assert code == 0, output
    assert f"starting over inside run {run_id}" in " ".join(output.split())  # may be wrapped
    (point,) = experiment_runs(uri, "device", "point")
    assert (point.info.run_id, point.info.status) == (run_id, "FINISHED")
    client = client_of(uri)
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(LOG_EVERY, 1001, LOG_EVERY))
    assert_each_step_logged_once(client, run_id)


# --------------------------------------------------------------------------------------------
# identity
# --------------------------------------------------------------------------------------------


def test_identity_follows_data_content_not_folders_or_cadence(
    tmp_path: Path, empty_store: Path, write_file: WriteFile, run: Run
) -> None:
    """One experiment file copied into two folders, each with its own corpus.txt, shares a
    store: the second trains (other data). Run again from another working folder with only
    checkpoint, log and cache settings changed, nothing trains."""
    uri = new_store(empty_store, tmp_path / "store" / "mlflow.db")
    files = {}
    # Texts of one length: only the content tells the corpora apart.
    for folder, text in (("one", "alpha beta gamma delta. "), ("two", "the quick brown fox ran.")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "corpus.txt").write_text(text * 400, encoding="utf-8")
        files[folder] = write_file(tmp_path / folder, "same", source="files", paths=["corpus.txt"])
    code, output = run(tmp_path, "run", str(files["one"]), "--tracking-uri", uri)
    assert code == 0 and "1 finished, 0 skipped" in output, output
    # From inside folder one: data.paths must still mean folder two's corpus.
    code, output = run(tmp_path / "one", "run", str(files["two"]), "--tracking-uri", uri)
    assert code == 0 and "1 finished, 0 skipped" in output, output
    runs = experiment_runs(uri, "same", "point")
    assert len({r.data.tags["config_hash"] for r in runs}) == 2
    assert len({r.data.tags["stackwise.data_fingerprint"] for r in runs}) == 2

    cadence = [
        "--set", "training.log_every_steps=3",
        "--set", "training.checkpoint.every_steps=7",
        "--set", "training.checkpoint.keep_last=4",
        "--set", "training.checkpoint.every_minutes=1",
        "--set", "training.cache.location=cpu",
        "--set", f"training.cache.directory={tmp_path / 'cache'}",
    ]  # fmt: skip
    code, output = run(tmp_path / "two", "run", str(files["one"]), "--tracking-uri", uri, *cadence)
    assert code == 0 and "0 finished, 1 skipped" in output, output
    assert len(experiment_runs(uri, "same", "point")) == 2


def test_identity_ignores_cadence_and_device_name_but_not_content(tmp_path: Path) -> None:
    """In-process: the hashes themselves (no training)."""
    from stackwise.config.base import StackWiseConfig
    from stackwise.identity import FingerprintCache, data_fingerprint, run_identity

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text " * 50, encoding="utf-8")
    base = {"data": {"source": "files", "paths": [str(corpus)]}}
    config = StackWiseConfig.from_dict(base)
    cache = FingerprintCache(tmp_path / "fingerprints.json")
    fingerprint = data_fingerprint(config.data, cache)
    identity = run_identity(config, "cpu", fingerprint)
    same = StackWiseConfig.from_dict(
        {
            **base,
            "training": {
                "device": "auto",
                "log_every_steps": 1,
                "checkpoint": {"every_steps": 3, "keep_last": 9, "every_minutes": None},
                "cache": {"location": "disk", "directory": "/elsewhere", "max_memory_gb": 1},
                "precision": "bf16",  # CPU trains in fp32 whatever it says
            },
            "tracking": {"uri": "sqlite:///x.db", "system_metrics": True},
        }
    )
    assert run_identity(same, "cpu", data_fingerprint(same.data, cache)) == identity
    assert run_identity(same, "cuda", fingerprint) != run_identity(config, "cuda", fingerprint)
    assert run_identity(config, "cuda", fingerprint) != identity
    seeded = StackWiseConfig.from_dict({**base, "training": {"seed": 1}})
    assert run_identity(seeded, "cpu", fingerprint) != identity
    # The fingerprint is the content (sha256 computed here independently), cached on disk.
    import hashlib

    assert (
        hashlib.sha256(corpus.read_bytes()).hexdigest()
        in (tmp_path / "fingerprints.json").read_text()
    )
    before = corpus.stat().st_mtime_ns
    corpus.write_text("more text " * 50, encoding="utf-8")  # same size, other content
    os.utime(corpus, ns=(before + 10**9, before + 10**9))  # coarse clocks: a visible change
    assert (
        data_fingerprint(config.data, FingerprintCache(tmp_path / "fingerprints.json"))
        != fingerprint
    )


def test_fingerprint_sees_a_same_size_edit_whose_mtime_was_restored(tmp_path: Path) -> None:
    """`cp -p`, `rsync -t` and `tar` restore the modification time: the content still counts."""
    import hashlib
    import time

    from stackwise.config.base import DataConfig
    from stackwise.identity import FingerprintCache, data_fingerprint

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("alpha " * 100, encoding="utf-8")
    data = DataConfig(source="files", paths=[str(corpus)])
    cache_file = tmp_path / "fingerprints.json"
    first = data_fingerprint(data, FingerprintCache(cache_file))
    stat = corpus.stat()
    time.sleep(0.05)  # a later status change on coarse clocks too
    corpus.write_text("omega " * 100, encoding="utf-8")  # same size
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # mtime put back
    assert corpus.stat().st_size == stat.st_size and corpus.stat().st_mtime_ns == stat.st_mtime_ns
    second = data_fingerprint(data, FingerprintCache(cache_file))
    assert second != first
    assert hashlib.sha256(corpus.read_bytes()).hexdigest() in cache_file.read_text()


# --------------------------------------------------------------------------------------------
# pre-checks
# --------------------------------------------------------------------------------------------


class _NotMlflow(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._page()

    def do_POST(self) -> None:
        self._page()

    def _page(self) -> None:
        body = b"<html><body>Hello, this is a web page.</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Serve silently: the test's output is the CLI's, not the server's access log."""


@pytest.fixture
def servers() -> Iterator[tuple[str, str]]:
    """(a web server that is not MLflow, a server that accepts and never answers)."""
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotMlflow)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        yield (
            f"http://127.0.0.1:{web.server_address[1]}",
            f"http://127.0.0.1:{silent.getsockname()[1]}",
        )
    finally:
        web.shutdown()
        web.server_close()
        silent.close()


def test_stores_that_cannot_work_are_one_line_errors(
    tmp_path: Path, servers: tuple[str, str], write_file: WriteFile, start: Start
) -> None:
    """run, compare and ui against a web page, a server that never answers and a database URI
    without its driver: exit 2 within 15 s, one error line, no traceback, nothing written."""
    web, silent = servers
    path = write_file(tmp_path, "checked")
    with socket.socket() as probe:  # a free port, so only the store can be wrong for `ui`
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cases = {
        "run web": (("run", str(path), "--tracking-uri", web), "is not an MLflow tracking server"),
        "compare web": (("compare", "checked", "--tracking-uri", web), "is not an MLflow"),
        "ui web": (("ui", "--tracking-uri", web, "--port", port), "is not an MLflow"),
        "run silent": (("run", str(path), "--tracking-uri", silent), "did not answer within 10 s"),
        "run postgres": (
            ("run", str(path), "--tracking-uri", "postgresql://u@127.0.0.1/mlflow"),
            "pip install psycopg2-binary",
        ),
    }
    processes = {
        name: (start(tmp_path, *args), expected) for name, (args, expected) in cases.items()
    }
    elapsed = {}
    for name, (cli, expected) in processes.items():
        output = cli.finish(timeout=60)
        elapsed[name] = cli.ended - cli.started
        assert cli.process.returncode == 2, (name, output)
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], (name, output)
        assert "Traceback" not in output, (name, output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checked.yaml"]
    # Within 15 s. On a loaded machine Python itself starts slowly: the quickest failure (a
    # missing driver, found without any network) measures that, and is allowed on top.
    startup = elapsed["run postgres"]
    assert elapsed["run silent"] - startup < 12, elapsed
    assert max(elapsed.values()) < 15 + max(0.0, startup - 3), elapsed


def test_read_only_store_is_reported(tmp_path: Path) -> None:
    from stackwise.tracking.store import check_tracking_uri

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store's folder would be", encoding="utf-8")
    problem = check_tracking_uri(f"sqlite:///{blocked}/sub/x.db")
    assert problem is not None and "is a file" in problem
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        problem = check_tracking_uri(f"sqlite:///{folder}/mlflow.db")
        assert problem is not None and "read-only" in problem
        assert local_root(f"sqlite:///{folder}/mlflow.db") == folder
    finally:
        folder.chmod(0o755)
