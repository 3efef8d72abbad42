"""What the trainer reports while it runs, and what it returns.

The trainer knows nothing about MLflow or terminals: it calls `TrainingCallback` hooks, and the
tracking layer (or a progress display, or a test) implements them. Every hook has a default that
does nothing, so a callback overrides only what it needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageInfo:
    """One step of training: a depth-wise stage, the single rackwise stage, or the fusion phase."""

    index: int  # 0-based position among all stages of the run
    name: str  # e.g. "block_3", "stack_1", "rack", "fusion"
    kind: str  # "block" | "stack" | "rack" | "fusion"
    trainable_blocks: tuple[int, int]  # flat block range [start, end) being trained
    steps: int  # optimizer steps planned for this stage
    trainable_parameters: int
    total_stages: int


@dataclass
class StageResult:
    """Measurements of one finished stage."""

    stage: StageInfo
    steps: int
    tokens: int
    train_loss: float  # mean of the last logged window
    val_loss: float | None
    val_perplexity: float | None
    wall_time_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    flops: float  # FLOPs actually executed (frozen trunk forward only; cache hits count nothing)
    mfu: float | None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingResults:
    """What `ArchitectureTrainer.train_architecture` returns."""

    training_architecture: str
    objective: str
    stages: list[StageResult]
    final_train_loss: float
    final_val_loss: float | None
    final_val_perplexity: float | None
    next_token_perplexity: float | None  # causal racks only
    total_steps: int
    total_tokens: int
    wall_time_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    flops: float
    mfu: float | None
    device: str
    extra: dict[str, float] = field(default_factory=dict)
    # Out-of-core runs: the trained rack as sharded safetensors (the rack object keeps its
    # blocks on the meta device); None when the rack in hand holds every weight.
    weights_dir: str | None = None
    final_test_loss: float | None = None  # over the whole held-out test split

    def summary_metrics(self) -> dict[str, float]:
        """Flat numeric summary, suitable for a tracking backend or a table row."""
        values: dict[str, float | None] = {
            "final_train_loss": self.final_train_loss,
            "final_val_loss": self.final_val_loss,
            "final_val_perplexity": self.final_val_perplexity,
            "final_test_loss": self.final_test_loss,
            "next_token_perplexity": self.next_token_perplexity,
            "total_steps": float(self.total_steps),
            "total_tokens": float(self.total_tokens),
            "wall_time_s": self.wall_time_s,
            "tokens_per_s": self.tokens_per_s,
            "peak_memory_bytes": float(self.peak_memory_bytes),
            "flops": self.flops,
            "mfu": self.mfu,
            **self.extra,
        }
        return {k: float(v) for k, v in values.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingCallback:
    """Hooks the trainer calls; `step` is always the global optimizer step (monotonic over stages)."""

    def on_train_start(self, stages: list[StageInfo]) -> None:
        """Called once with the full stage plan."""

    def on_stage_start(self, stage: StageInfo, step: int) -> None:
        """A stage begins (after its cache is built)."""

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalar metrics at `step`, e.g. train/loss, train/lr, train/tokens_per_s, val/loss."""

    def on_stage_end(self, result: StageResult, step: int) -> None:
        """A stage finished."""

    def on_before_checkpoint(self, step: int) -> None:
        """A checkpoint at `step` is about to be written; a resume from it will not report the
        steps before it again, so anything buffered must be made durable now."""

    def on_checkpoint(self, path: Path, step: int) -> None:
        """A checkpoint was written to `path`."""

    def on_train_end(self, results: TrainingResults) -> None:
        """Training finished successfully."""
