"""Stopping a run by signal: SIGTERM and SIGHUP raised as `Interrupted`, Ctrl-C's twin.

`timeout`, Slurm preemption and `docker stop` send SIGTERM or SIGHUP; within
`signals_as_interrupts` they stop a grid exactly as Ctrl-C does (the trainer saves a checkpoint,
the point and parent runs are marked KILLED), and the exit status names the signal.
`signals_deferred` holds the three stop signals for a short step that must not be cut in the
middle (handing a task to a cluster and recording it, shutting a cluster down).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt so every
    layer does what it does for Ctrl-C (checkpoint, KILLED runs); `signum` gives the exit
    status (128 + signum: 143 for SIGTERM, 129 for SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Interrupted` (once: further ones are ignored
    while the run shuts down, so its checkpoint is not cut short). A signal the process was
    started with ignored (``nohup``) stays ignored. Only the main thread can install handlers;
    elsewhere this does nothing.

    A library that catches the KeyboardInterrupt a handler raises inside its own calls and
    raises a new, plain one (Ray does, in ``ray.wait`` and ``ray.get``) loses the signal; a
    plain KeyboardInterrupt that leaves the block after a SIGTERM or SIGHUP is raised again as
    that signal's `Interrupted`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    previous: dict[int, Any] = {}
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) not in (signal.SIG_IGN, None):  # None: not Python's
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    except KeyboardInterrupt as error:
        if received and type(error) is KeyboardInterrupt:
            raise Interrupted(received[0]) from error
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


HELD_SIGNALS: tuple[int, ...] = (signal.SIGINT, *STOP_SIGNALS)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP wait: the first that arrives is sent again
    when the block ends, to whatever handled it before (so it stops the run then, as it would
    have). For short steps only; elsewhere than the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if not held:
            held.append(signum)

    previous: dict[int, Any] = {}
    try:
        for sig in HELD_SIGNALS:
            if signal.getsignal(sig) not in (signal.SIG_IGN, None):  # None: not Python's
                previous[sig] = signal.signal(sig, hold)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if held:
            signal.raise_signal(held[0])
