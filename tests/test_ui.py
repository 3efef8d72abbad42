"""`stackwise ui` serves the project's store on loopback, and its REST API lists our runs."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from stackwise.tracking.ui import ui_command

Helper = Callable[..., Any]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_ui_command_names_store_and_artifacts() -> None:
    command = ui_command("sqlite:////data/mlruns/mlflow.db", port=5055)
    assert command[command.index("--backend-store-uri") + 1] == "sqlite:////data/mlruns/mlflow.db"
    assert command[command.index("--default-artifact-root") + 1] == "file:///data/mlruns/artifacts"
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "5055"


@pytest.mark.slow
def test_ui_serves_runs_on_loopback(
    tracked: dict[str, Any], cli_command: Helper, cli_env: Helper
) -> None:
    port = _free_port()
    process = subprocess.Popen(
        cli_command("ui", "--port", str(port)),
        cwd=tracked["cwd"],
        env=cli_env(tracked["cwd"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the UI did not answer in time"
            with (
                contextlib.suppress(OSError),  # not listening yet
                urllib.request.urlopen(f"{base}/health", timeout=2) as response,
            ):
                if response.status == 200:
                    break
            time.sleep(0.5)
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [tracked["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            runs = json.loads(response.read())["runs"]
        names = {r["info"]["run_name"] for r in runs}
        assert {"rackwise", "stackwise"} <= names
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert f"{base}" in output
    # The server (and its workers) went away with the command.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_ui_on_a_port_in_use_is_a_user_error(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from stackwise.cli import app

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
        result = CliRunner().invoke(app, ["ui", "--port", str(port), "--tracking-uri", uri])
    assert result.exit_code == 2
    assert f"port {port} on 127.0.0.1 is in use" in result.output
    assert list(tmp_path.iterdir()) == []  # nothing created for a server that never starts


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "99999"], "--port: must be from 0 to 65535 (0 picks a free port), got 99999"),
        (["--port", "-1"], "--port: must be from 0 to 65535 (0 picks a free port), got -1"),
        (["--host", "no-such-host.invalid"], "--host: cannot resolve 'no-such-host.invalid'"),
        (["--host", "192.0.2.1"], "--host: 192.0.2.1 is not an address of this machine"),
    ],
)
def test_ui_bad_host_or_port_is_a_clear_user_error(
    args: list[str], message: str, tmp_path: Any, cli_command: Helper, cli_env: Helper
) -> None:
    done = subprocess.run(
        cli_command("ui", *args, "--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db"),
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: {message}" in done.stderr
    assert "Traceback" not in done.stderr and "in use" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_bind_problem_speaks_of_ipv6_hosts_correctly() -> None:
    from stackwise.tracking.ui import bind_problem, free_port, ui_url

    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        port = free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert bind_problem("::1", port) is None  # the v4-only check called this "in use"
    assert ui_url("::1", port) == f"http://[::1]:{port}"
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as busy:
        busy.bind(("::1", port))
        busy.listen()
        assert bind_problem("::1", port) == (
            f"--port: port {port} on ::1 is in use; choose another with --port"
        )


@pytest.mark.slow
def test_ui_port_zero_prints_the_real_port_once_the_server_answers(
    tmp_path: Any, cli_command: Helper, cli_env: Helper
) -> None:
    process = subprocess.Popen(
        cli_command("ui", "--port", "0", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"),
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "the command ended before printing a URL"
            if "http://" in line:
                url = line.split()[0]
        assert url is not None and not url.endswith(":0")
        # Printed only once the server answers: it answers right away.
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
