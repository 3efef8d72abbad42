"""Stopping a run by signal: SIGTERM and SIGHUP raised as `Interrupted`, Ctrl-C's twin.

`timeout`, Slurm preemption and `docker stop` send SIGTERM or SIGHUP; within
`signals_as_interrupts` they stop a grid exactly as Ctrl-C does (the trainer saves a checkpoint,
the point and parent runs are marked KILLED), and the exit status names the signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt so every
    layer does what it does for Ctrl-C (checkpoint, KILLED runs); `signum` gives the exit
    status (128 + signum: 143 for SIGTERM, 129 for SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Interrupted` (once: further ones are ignored
    while the run shuts down, so its checkpoint is not cut short). A signal the process was
    started with ignored (``nohup``) stays ignored. Only the main thread can install handlers;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    previous = {}
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
