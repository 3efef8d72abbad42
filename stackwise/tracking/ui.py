"""`stackwise ui`: the MLflow UI on the project's store.

A bare ``mlflow ui`` does not look in ``./mlruns/mlflow.db``: with no tracking URI, MLflow 3
uses ``./mlflow.db`` in the working directory, unless ``./mlruns`` holds an old file store. So
the server is always started with the store and artifact root spelled out::

    mlflow server --backend-store-uri sqlite:///<abs>/mlruns/mlflow.db
                  --default-artifact-root <abs>/mlruns/artifacts --host 127.0.0.1 --port 5000

It binds to 127.0.0.1 unless told otherwise (MLflow's own host-header checks stay on). A remote
tracking server needs no local UI: its URL is printed instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from rich.console import Console

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


def ui_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


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
    if not port_is_free(host, port):
        console.print(f"[red]port {port} on {host} is in use; choose another with --port[/]")
        return 2
    # Create the store (and its tables) now, so the server and a concurrent run never race to.
    prepare_store(tracking_uri)
    open_client(tracking_uri)
    console.print(f"MLflow UI for {tracking_uri}")
    console.print(f"  [bold]{ui_url(host, port)}[/]   (Ctrl-C to stop)")
    # Its own process group: MLflow starts worker processes, and stopping the UI must stop all
    # of them, whether we get Ctrl-C or a SIGTERM.
    process = subprocess.Popen(
        ui_command(tracking_uri, host, port), cwd=Path.cwd(), start_new_session=True
    )

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return _stop_group(process)
    finally:
        signal.signal(signal.SIGTERM, previous)


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
