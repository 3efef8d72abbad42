"""`stackwise ui`: the MLflow UI on the project's store.

A bare ``mlflow ui`` does not look in ``./mlruns/mlflow.db``: with no tracking URI, MLflow 3
uses ``./mlflow.db`` in the working directory, unless ``./mlruns`` holds an old file store. So
the server is always started with the store and artifact root spelled out::

    mlflow server --backend-store-uri sqlite:///<abs>/mlruns/mlflow.db
                  --default-artifact-root <abs>/mlruns/artifacts --host 127.0.0.1 --port 5000

It binds to 127.0.0.1 unless told otherwise (MLflow's own host-header checks stay on). A remote
tracking server needs no local UI: its URL is printed instead.

Before starting, the host and port are checked (`bind_problem`): a port outside 0-65535, a
host name that does not resolve, an address that is not this machine's and a port in use each
get their own message. ``--port 0`` picks a free port. The URL is printed once the server
answers on it (`wait_until_serving`), not when the process starts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from stackwise.tracking.store import (
    artifact_root,
    file_store_path,
    is_local_store,
    open_client,
    prepare_store,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000


def ui_command(tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> list[str]:
    """The `mlflow server` command line that serves `tracking_uri` (a local store)."""
    root = artifact_root(tracking_uri)
    if root is None:
        folder = file_store_path(tracking_uri)
        root = folder.as_uri() if folder is not None else None
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if root is not None:
        command += ["--default-artifact-root", root]
    return command


# How long the server may take to answer before `stackwise ui` gives up on it.
STARTUP_TIMEOUT = 120.0


def ui_url(host: str, port: int) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in shown:  # an IPv6 address goes in brackets
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def _address(host: str, port: int) -> tuple[int, tuple[object, ...]]:
    """Socket family and address to bind `host:port` (raises socket.gaierror if unknown)."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, address


def bind_problem(host: str, port: int) -> str | None:
    """Why the UI cannot listen on `host:port`, as a one-line message (None when it can)."""
    if not 0 <= port <= 65535:
        return f"--port: must be from 0 to 65535 (0 picks a free port), got {port}"
    try:
        family, address = _address(host, port)
    except (socket.gaierror, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        return f"--host: cannot resolve {host!r} ({reason}); give a name or address of this machine"
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return f"--port: port {port} on {host} is in use; choose another with --port"
            if error.errno == errno.EADDRNOTAVAIL:
                return f"--host: {host} is not an address of this machine"
            if error.errno == errno.EACCES:
                return f"--port: no permission to listen on port {port}; use a port above 1023"
            return f"--host: cannot listen on {host} port {port}: {error.strerror or error}"
    return None


def port_is_free(host: str, port: int) -> bool:
    return bind_problem(host, port) is None


def free_port(host: str) -> int:
    """A port that is free on `host` now (what ``--port 0`` means)."""
    family, address = _address(host, 0)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(address)
        return int(probe.getsockname()[1])


def wait_until_serving(
    process: subprocess.Popen[bytes], url: str, timeout: float = STARTUP_TIMEOUT
) -> bool:
    """Poll `url`/health until the server answers (True), or its process ends or `timeout`
    passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # something answers over HTTP on the port: the server is up
        except OSError:
            time.sleep(0.25)
    return False


def launch_ui(
    tracking_uri: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    console: Console | None = None,
) -> int:
    """Serve the MLflow UI on `tracking_uri` until interrupted; returns the server's exit code."""
    console = console or Console()
    if not is_local_store(tracking_uri):
        console.print(
            f"{tracking_uri} is a tracking server, not a local store: open it in a browser "
            f"(or run `mlflow ui` where the store lives)."
        )
        return 0
    problem = bind_problem(host, port)
    if problem is not None:
        console.print(f"[red]{problem}[/]")
        return 2
    if port == 0:
        port = free_port(host)
    # Create the store (and its tables) now, so the server and a concurrent run never race to.
    prepare_store(tracking_uri)
    open_client(tracking_uri)
    url = ui_url(host, port)
    console.print(f"MLflow UI for {tracking_uri}: starting on port {port} …")
    # Its own process group: MLflow starts worker processes, and stopping the UI must stop all
    # of them, whether we get Ctrl-C or a SIGTERM.
    process = subprocess.Popen(
        ui_command(tracking_uri, host, port), cwd=Path.cwd(), start_new_session=True
    )

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        if wait_until_serving(process, url):
            console.print(f"  [bold]{url}[/]   (Ctrl-C to stop)")
            for name, link in experiment_links(tracking_uri, url):
                console.print(f"  {escape(name)}: {link}", highlight=False)
        elif process.poll() is None:
            console.print(f"[red]the MLflow server did not answer on {url} in time[/]")
            return _stop_group(process) or 1
        else:
            console.print(f"[red]the MLflow server stopped before answering on {url}[/]")
        return process.wait()
    except KeyboardInterrupt:
        return _stop_group(process)
    finally:
        signal.signal(signal.SIGTERM, previous)


# MLflow 3's UI opens an experiment on its GenAI overview (traces, token usage) unless the URL
# asks for the training runs: `workflowType` is read from the URL, else from the browser's
# storage, where it defaults to GenAI. A view shared through an experiment tag
# (`mlflow.sharedViewState.<key>`, opened with `viewStateShareKey=<key>`) picks the columns: the
# headline results and the grid coordinates, grid points only (no empty parent runs).
RUNS_VIEW = "runs?workflowType=machine_learning"
VIEW_KEY = "stackwise"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_METRICS = (
    "val_loss",
    "test_loss",
    "flops",
    "training_memory_mb",
    "wall_time_s",
)
MAX_LINKS = 10  # experiments linked by name; more are found from the first page


def runs_view(grid_axes: Sequence[str]) -> str:
    """The shared view of an experiment's runs (JSON): its grid points, newest first, with
    `VIEW_METRICS` and the grid coordinates as columns."""
    columns = [f"tags.`grid.{axis}`" for axis in grid_axes]
    columns += [f"metrics.`{name}`" for name in VIEW_METRICS]
    state = {
        "searchFilter": "tags.`stackwise.role` = 'point'",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "selectedColumns": columns,
    }
    return json.dumps(state)


def experiment_link(url: str, experiment_id: str, shared_view: bool = True) -> str:
    """The page of an experiment's training runs (its runs table, not the GenAI overview)."""
    view = f"&viewStateShareKey={VIEW_KEY}" if shared_view else ""
    return f"{url}/#/experiments/{experiment_id}/{RUNS_VIEW}{view}"


def experiment_links(tracking_uri: str, url: str) -> list[tuple[str, str]]:
    """(name, runs-table link) of the store's experiments, newest first, up to `MAX_LINKS`
    (the empty Default experiment left out)."""
    from mlflow.entities import ViewType

    client = open_client(tracking_uri)
    experiments = client.search_experiments(
        view_type=ViewType.ACTIVE_ONLY, max_results=MAX_LINKS + 1, order_by=["creation_time DESC"]
    )
    shown = [e for e in experiments if e.name != "Default"][:MAX_LINKS]
    return [(e.name, experiment_link(url, e.experiment_id, VIEW_TAG in e.tags)) for e in shown]


def _stop_group(process: subprocess.Popen[bytes]) -> int:
    for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # The group may outlive its leader by a moment; make sure no worker is left behind.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    return 0
