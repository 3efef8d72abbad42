"""What a stage executes: tokens, FLOPs, training seconds and wall-clock seconds.

The trainer counts into one `StageMeter` per stage. *Training seconds* are the time spent in
optimizer steps and in building the activation cache — the same work the FLOPs count — so
throughput (tokens/s) and MFU divide quantities of the same interval; evaluation and
checkpoint writing are in the stage's *wall* time only. The meter's state is plain numbers, so
a checkpoint stores it and a resumed stage continues its counts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field


@dataclass
class StageMeter:
    """Counters of the running stage (see the module docstring)."""

    tokens: int = 0  # training tokens processed (revisits of the sample pool included)
    flops: float = 0.0  # executed training FLOPs (trainable piece, trunk forward, cache build)
    train_seconds: float = 0.0  # time in steps and cache building
    wall_before: float = 0.0  # wall seconds of earlier segments (before a resume)
    peak_bytes: int = 0  # peak memory of earlier segments
    _segment_start: float = field(default_factory=time.perf_counter, repr=False)
    _interval_tokens: int = field(default=0, repr=False)
    _interval_seconds: float = field(default=0.0, repr=False)

    def start(self) -> None:
        """The stage (or its resumed remainder) starts running now."""
        self._segment_start = time.perf_counter()

    def count(self, tokens: int, flops: float) -> None:
        """A micro-batch of `tokens` tokens that executed `flops` FLOPs."""
        self.tokens += tokens
        self.flops += flops
        self._interval_tokens += tokens

    def add_flops(self, flops: float) -> None:
        """Work that processes no new training tokens (building the activation cache)."""
        self.flops += flops

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Time the enclosed work as training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.train_seconds += seconds
            self._interval_seconds += seconds

    def interval_tokens_per_s(self) -> float:
        """Training tokens per training second since the previous call (for logging)."""
        rate = self._interval_tokens / max(self._interval_seconds, 1e-9)
        self._interval_tokens, self._interval_seconds = 0, 0.0
        return rate

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self._segment_start

    def tokens_per_s(self) -> float:
        return self.tokens / max(self.train_seconds, 1e-9)

    def mfu(self, peak_flops: float | None) -> float | None:
        """FLOPs per training second relative to the device peak (None when unknown)."""
        if peak_flops is None:
            return None
        return self.flops / max(self.train_seconds, 1e-9) / peak_flops

    def state(self, peak_bytes: int = 0) -> dict[str, float]:
        """Plain numbers for a checkpoint (wall time up to now, peak so far)."""
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        data["wall_before"] = self.wall_seconds()
        data["peak_bytes"] = max(self.peak_bytes, peak_bytes)
        return data

    @classmethod
    def from_state(cls, state: dict[str, float]) -> StageMeter:
        return cls(
            tokens=int(state["tokens"]),
            flops=float(state["flops"]),
            train_seconds=float(state["train_seconds"]),
            wall_before=float(state["wall_before"]),
            peak_bytes=int(state["peak_bytes"]),
        )
