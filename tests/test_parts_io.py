"""Parts that deal with files, other processes and the clock, each on its own: the tracking
store's file lock and its retry of locked SQLite writes, the out-of-core piece store, and the
stage meter.

Every expected value comes from outside the code under test: the operating system's own lock
(``flock`` in another process), a real SQLite lock, an independent reader of the files written
(safetensors), an in-memory rack of the same seed, or a count by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from stackwise.model.architecture import create_rack_from_config
from stackwise.model.materialize import load_sharded_rack
from stackwise.tracking import store
from stackwise.tracking.store import FileLock, is_locked, retry_locked
from stackwise.training import meter as meter_module
from stackwise.training.meter import StageMeter
from stackwise.training.pieces import PieceStore

CPU = torch.device("cpu")
TinyConfig = Callable[..., Any]  # the `tiny_config` fixture (conftest.py)


# -- the file lock ------------------------------------------------------------------------------

# Another process that takes the OS lock (plain flock, not FileLock) on a file, says "held" and
# keeps it until it is killed.
HOLDER = textwrap.dedent(
    """
    import fcntl, sys, time
    handle = open(sys.argv[1], "a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(600)
    """
)

# Another process that tries to take the OS lock without waiting and says whether it could.
PROBE = textwrap.dedent(
    """
    import fcntl, sys
    with open(sys.argv[1], "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("busy")
        else:
            print("free")
    """
)


@contextlib.contextmanager
def held_elsewhere(path: Path) -> Iterator[subprocess.Popen[str]]:
    """`path` locked by another process until the block ends or the process is killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "held"
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)
        assert process.stdout is not None
        process.stdout.close()


def probe(path: Path) -> str:
    """Whether some process holds the OS lock on `path`, as another process sees it: "busy" or
    "free"."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_a_lock_another_process_holds_is_waited_for_until_that_process_dies(
    tmp_path: Path,
) -> None:
    path = tmp_path / "held.lock"
    acquired = threading.Event()
    waiter = FileLock(path)
    with held_elsewhere(path) as holder:
        assert is_locked(path)
        lock = FileLock(path)
        assert lock.acquire(blocking=False) is False and not lock.held
        thread = threading.Thread(target=lambda: (waiter.acquire(), acquired.set()), daemon=True)
        thread.start()
        assert not acquired.wait(0.5)  # still waiting while the other process holds it
        holder.kill()  # no release: the OS frees the lock of a process that dies
        assert acquired.wait(30)
        thread.join(timeout=30)
    assert waiter.held and probe(path) == "busy"
    waiter.release()
    assert not waiter.held and probe(path) == "free" and not is_locked(path)


def test_a_held_lock_shuts_other_processes_out_and_names_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "grid.lock"
    assert not is_locked(path) and probe(tmp_path / "unrelated.lock") == "free"
    path.parent.mkdir()
    path.write_text("an-earlier-holder.example.org:123456789\n", encoding="utf-8")
    with FileLock(path) as lock:
        assert lock.held
        assert probe(path) == "busy"
        # Exactly this process, nothing left of the earlier holder's longer line.
        assert path.read_text(encoding="utf-8") == f"{socket.gethostname()}:{os.getpid()}\n"
    assert not lock.held and probe(path) == "free"
    with pytest.raises(RuntimeError), FileLock(path):
        raise RuntimeError("a failure inside the lock")
    assert probe(path) == "free"  # released on the way out of an error too


def test_locks_on_one_file_exclude_each_other_within_one_process_too(tmp_path: Path) -> None:
    path = tmp_path / "shared.lock"
    events: list[tuple[str, int]] = []

    def work(name: int) -> None:
        with FileLock(path):
            events.append(("in", name))
            time.sleep(0.05)  # long enough for the others to try to get in
            events.append(("out", name))

    threads = [threading.Thread(target=work, args=(name,), daemon=True) for name in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), events  # every one got its turn
    # One holder at a time: every entry is directly followed by that holder's own exit.
    assert len(events) == 8
    pairs = list(zip(events[::2], events[1::2], strict=True))
    assert all(a == ("in", b[1]) and b[0] == "out" for a, b in pairs), events
    assert sorted(b[1] for _, b in pairs) == [0, 1, 2, 3]


# -- retrying locked writes ----------------------------------------------------------------------


class Flaky:
    """An action that raises `errors` one per call, then returns "done"; counts its calls."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays `retry_locked` waits, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(store, "time", SimpleNamespace(sleep=slept.append))
    return slept


LOCK_ERRORS = [
    sqlite3.OperationalError("database is locked"),
    sqlite3.OperationalError("database table is locked"),
    # What MLflow raises: SQLAlchemy's error text inside its own exception type.
    RuntimeError("(sqlite3.OperationalError) database is locked [SQL: INSERT INTO metrics]"),
    RuntimeError("Database Is Locked"),
    RuntimeError("the database is busy"),
]


@pytest.mark.parametrize("error", LOCK_ERRORS, ids=str)
def test_a_lock_error_is_retried_until_the_action_succeeds(
    error: Exception, sleeps: list[float]
) -> None:
    action = Flaky(error, error)
    assert retry_locked(action) == "done"
    assert action.calls == 3 and len(sleeps) == 2


def test_a_lock_that_outlasts_the_attempts_is_raised_after_the_last(sleeps: list[float]) -> None:
    errors = [sqlite3.OperationalError(f"database is locked ({n})") for n in range(5)]
    action = Flaky(*errors)
    with pytest.raises(sqlite3.OperationalError) as caught:
        retry_locked(action, attempts=3)
    assert caught.value is errors[2]  # the third try's own error, not a new one
    assert action.calls == 3 and len(sleeps) == 2  # no wait after the last try


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value"),
        sqlite3.OperationalError("no such table: runs"),
        sqlite3.IntegrityError("UNIQUE constraint failed: experiments.name"),
        KeyError("run"),
    ],
    ids=repr,
)
def test_any_other_error_is_raised_at_once(error: Exception, sleeps: list[float]) -> None:
    action = Flaky(error)
    with pytest.raises(type(error)) as caught:
        retry_locked(action)
    assert caught.value is error
    assert action.calls == 1 and sleeps == []


@pytest.mark.parametrize(("draw", "factor"), [(0.0, 0.5), (0.5, 1.0), (0.999, 1.499)])
def test_the_waits_double_with_a_jitter_of_half_either_way(
    draw: float, factor: float, sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "random", SimpleNamespace(random=lambda: draw))
    locked = sqlite3.OperationalError("database is locked")
    with pytest.raises(sqlite3.OperationalError):
        retry_locked(Flaky(*[locked] * 8))  # the defaults: 8 tries from 0.2 s
    assert sleeps == pytest.approx([factor * s for s in (0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8)])
    if draw == 0.5:
        assert sum(sleeps) == pytest.approx(25.4)  # "about 25 s" on top of MLflow's own wait


def test_a_real_sqlite_lock_is_waited_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    database = tmp_path / "store.db"
    with contextlib.closing(sqlite3.connect(database)) as setup:
        setup.execute("CREATE TABLE runs (id INTEGER)")
        setup.commit()
    holder = sqlite3.connect(database, isolation_level=None)
    writer = sqlite3.connect(database, timeout=0, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        waits: list[float] = []

        def sleep(seconds: float) -> None:  # the other writer finishes while this one waits
            waits.append(seconds)
            holder.execute("COMMIT")

        monkeypatch.setattr(store, "time", SimpleNamespace(sleep=sleep))
        retry_locked(lambda: writer.execute("INSERT INTO runs VALUES (1)"))
        assert len(waits) == 1
        assert writer.execute("SELECT id FROM runs").fetchall() == [(1,)]
    finally:
        holder.close()
        writer.close()


# -- the out-of-core piece store ----------------------------------------------------------------


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bitwise equal state dicts (same keys, same dtypes and values)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def in_memory(module: nn.Module) -> bool:
    """Whether every weight of `module` holds numbers (none is on the meta device)."""
    return not any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def trained(block: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Move every weight of `block` away from its seeded initial value; its new state."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    return state_of(block)


class Pieces:
    """A `PieceStore` over a rack built on the meta device, the in-memory rack of the same
    seed (the reference), and the block swaps the store reported."""

    def __init__(self, config: Any, folder: Path) -> None:
        self.reference = create_rack_from_config(config)
        with torch.device("meta"):
            self.rack = create_rack_from_config(config)
        self.folder = folder
        self.replaced: list[tuple[int, nn.Module]] = []
        self.store = PieceStore(
            self.rack, folder, CPU, lambda index, block: self.replaced.append((index, block))
        )


THREE_STACKS = {
    "stacks": [{"n_blocks": 1}, {"n_blocks": 1, "freeze_blocks": True}, {"n_blocks": 1}]
}


@pytest.fixture
def pieces(tiny_config: TinyConfig, tmp_path: Path) -> Pieces:
    """Three one-block stacks, the middle one declared frozen; pieces in ``tmp_path/pieces``."""
    return Pieces(tiny_config("blockwise", model=THREE_STACKS), tmp_path / "pieces")


def test_blocks_are_drawn_as_an_in_memory_rack_of_the_same_seed_has_them(pieces: Pieces) -> None:
    rack, reference = pieces.rack, pieces.reference
    # The rest of the rack is in memory from the start, the blocks are not.
    assert in_memory(rack.token_embedding) and in_memory(rack.norm) and in_memory(rack.lm_head)
    assert same(state_of(rack.token_embedding), state_of(reference.token_embedding))
    assert not any(in_memory(block) for block in rack.blocks)
    block = pieces.store.bring_in(2)
    assert rack.blocks[2] is block and pieces.replaced == [(2, block)]
    assert same(state_of(block), state_of(reference.blocks[2]))
    assert all(p.requires_grad for p in block.parameters())
    assert not in_memory(rack.blocks[0]) and not in_memory(rack.blocks[1])
    assert pieces.store.bring_in(2) is block and len(pieces.replaced) == 1  # as it is
    frozen = pieces.store.bring_in(1)  # its stack is declared frozen
    assert same(state_of(frozen), state_of(reference.blocks[1]))
    assert not any(p.requires_grad for p in frozen.parameters())
    assert pieces.store.saved() == {} and not list(pieces.folder.parent.rglob("*.safetensors"))


def test_a_block_put_away_is_written_and_read_back_bitwise(pieces: Pieces) -> None:
    rack, store = pieces.rack, pieces.store
    weights = trained(store.bring_in(0), seed=1)
    other = trained(store.bring_in(2), seed=2)
    store.put_away(0)
    path = pieces.folder / "block-00000.safetensors"
    assert store.saved() == {0: path}
    assert same(load_file(path), weights)  # an independent reader sees exactly the weights
    assert not in_memory(rack.blocks[0])  # nothing of it stays in memory...
    assert same(state_of(rack.blocks[2]), other)  # ...and the others are left as they were
    assert in_memory(rack.token_embedding) and in_memory(rack.lm_head)
    back = store.bring_in(0)
    assert same(state_of(back), weights)  # from its file, not drawn again
    assert [index for index, _ in pieces.replaced] == [0, 2, 0]
    store.put_away(1)  # never brought in: nothing to write
    assert store.saved() == {0: path} and not in_memory(rack.blocks[1])


def test_a_block_that_is_away_is_borrowed_without_being_brought_back(pieces: Pieces) -> None:
    rack, store = pieces.rack, pieces.store
    weights = trained(store.bring_in(0), seed=1)
    store.put_away(0)
    replaced = len(pieces.replaced)
    with store.borrow(0) as borrowed:
        assert same(state_of(borrowed), weights) and not borrowed.training
        assert rack.blocks[0] is not borrowed
    assert not in_memory(rack.blocks[0]) and len(pieces.replaced) == replaced
    with store.borrow(2) as borrowed:  # never trained: its seeded initial weights
        assert same(state_of(borrowed), state_of(pieces.reference.blocks[2]))
    assert not in_memory(rack.blocks[2])
    here = store.bring_in(1)
    with store.borrow(1) as borrowed:  # in memory: the block itself
        assert borrowed is here
    assert rack.blocks[1] is here and in_memory(here)


def test_the_written_rack_is_every_block_as_it_stood(pieces: Pieces, tmp_path: Path) -> None:
    rack, store, reference = pieces.rack, pieces.store, pieces.reference
    away = trained(store.bring_in(0), seed=1)
    store.put_away(0)
    held = trained(store.bring_in(1), seed=2)  # still in memory when the rack is written
    store.write_rack(tmp_path / "rack")
    written = load_sharded_rack(tmp_path / "rack")
    assert same(state_of(written.blocks[0]), away)
    assert same(state_of(written.blocks[1]), held)
    assert same(state_of(written.blocks[2]), state_of(reference.blocks[2]))  # never trained
    assert same(state_of(written.token_embedding), state_of(reference.token_embedding))
    assert same(state_of(written.norm), state_of(reference.norm))
    assert not any(in_memory(block) for block in rack.blocks)  # all put away on the way
    assert sorted(store.saved()) == [0, 1, 2]


# -- the stage meter -------------------------------------------------------------------------------


class Clock:
    """A `time.perf_counter` that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The clock the stage meter reads."""
    clock = Clock()
    monkeypatch.setattr(meter_module, "time", SimpleNamespace(perf_counter=clock))
    return clock


def test_the_meter_counts_tokens_flops_and_training_seconds_by_hand(clock: Clock) -> None:
    meter = StageMeter()
    meter.start()
    for tokens, flops in [(128, 1e6), (128, 1e6), (64, 5e5)]:  # three steps of 0.5 s
        with meter.training():
            clock.now += 0.5
            meter.count(tokens, flops)
    with meter.training():  # building the activation cache: FLOPs, no new tokens
        clock.now += 0.25
        meter.add_flops(2e6)
    clock.now += 1.0  # evaluation: wall time only
    assert (meter.tokens, meter.flops) == (320, 4.5e6)
    assert meter.train_seconds == pytest.approx(1.75)
    assert meter.wall_seconds() == pytest.approx(2.75)
    assert meter.tokens_per_s() == pytest.approx(320 / 1.75)
    assert meter.mfu(1e7) == pytest.approx(4.5e6 / 1.75 / 1e7)
    assert meter.mfu(None) is None
    assert meter.interval_tokens_per_s() == pytest.approx(320 / 1.75)
    with meter.training():
        clock.now += 0.25
        meter.count(50, 0.0)
    assert meter.interval_tokens_per_s() == pytest.approx(50 / 0.25)  # since the last call only
    with pytest.raises(RuntimeError), meter.training():
        clock.now += 2.0
        raise RuntimeError("a failed step")
    assert meter.train_seconds == pytest.approx(4.0)  # a failed step's time is training time


def test_the_meter_state_round_trips_and_a_resumed_stage_continues_its_counts(
    clock: Clock,
) -> None:
    meter = StageMeter()
    meter.start()
    with meter.training():
        clock.now += 2.0
        meter.count(256, 3e6)
    meter.add_flops(1e6)
    clock.now += 1.0
    state = json.loads(json.dumps(meter.state(peak_bytes=5000)))  # what a checkpoint holds
    assert state == {
        "tokens": 256,
        "flops": 4e6,
        "train_seconds": 2.0,
        "wall_before": 3.0,
        "peak_bytes": 5000,
    }
    resumed = StageMeter.from_state(state)
    fields = (resumed.tokens, resumed.flops, resumed.train_seconds, resumed.wall_before)
    assert fields == (256, 4e6, 2.0, 3.0) and resumed.peak_bytes == 5000
    clock.now += 60.0  # between the interruption and the resume: not the stage's time
    resumed.start()
    with resumed.training():
        clock.now += 1.0
        resumed.count(128, 1e6)
    clock.now += 0.5
    assert (resumed.tokens, resumed.flops) == (384, 5e6)
    assert resumed.train_seconds == pytest.approx(3.0)
    assert resumed.wall_seconds() == pytest.approx(4.5)
    assert resumed.interval_tokens_per_s() == pytest.approx(128 / 1.0)  # this segment's
    assert resumed.state(peak_bytes=100)["peak_bytes"] == 5000  # earlier segments' peak kept
    assert resumed.state(peak_bytes=9000)["peak_bytes"] == 9000
