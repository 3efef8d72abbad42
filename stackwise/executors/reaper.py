"""The processes a driver started, ended when the driver is killed outright.

A local Ray cluster started by `stackwise run --executor ray` is a tree of processes under the
driver (GCS, raylet, and the raylet's agents and workers). When the driver ends in any way it
can handle, it shuts the cluster down. SIGKILL leaves it nothing to run: the cluster's helpers
then outlive it by about a minute (until they notice on their own). `watch(pid)` starts a small
process in a session of its own that keeps a list of the driver's descendants (by pid and start
time, refreshed every `INTERVAL` seconds) and, once the driver is gone, SIGKILLs those of them
still running — never a process that merely reused a pid. It ends with the driver, whatever
the way.

Run as ``python -m stackwise.executors.reaper PID``; it imports nothing of StackWise but this.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

INTERVAL = 0.5  # seconds between looks at the driver's process tree


def watch(pid: int | None = None) -> subprocess.Popen[bytes]:
    """Start the watcher of process `pid` (default: this one)."""
    return subprocess.Popen(
        [sys.executable, "-m", "stackwise.executors.reaper", str(pid or os.getpid())],
        start_new_session=True,  # a signal to the driver's group does not reach it
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap(pid: int, interval: float = INTERVAL) -> list[int]:
    """Follow process `pid` until it is gone, then SIGKILL its last known descendants that
    still run (same pid and start time). Returns the pids killed."""
    import psutil

    try:
        driver = psutil.Process(pid)
    except psutil.Error:
        return []
    known: dict[int, float] = {}
    while True:
        try:
            found = {}
            for child in driver.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    found[child.pid] = child.create_time()
            # Once the driver is gone its children belong to another parent: keep what was
            # known while it lived.
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        except psutil.Error:
            found = {}
        known.update(found)
        time.sleep(interval)
    known.pop(os.getpid(), None)  # the watcher is one of the driver's children too
    killed = []
    for child_pid, started in known.items():
        with contextlib.suppress(psutil.Error, OSError):
            if psutil.Process(child_pid).create_time() == started and _alive(child_pid):
                os.kill(child_pid, signal.SIGKILL)
                killed.append(child_pid)
    return killed


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver
    reap(int(sys.argv[1]))


if __name__ == "__main__":
    main()
