"""Where a run stands, as one dataclass that is also its checkpoint state.

`RunPosition` holds the trainer's place in a run — stage, step, data position, the counts so
far and the stages finished — and is what a checkpoint's ``state.json`` stores: `to_state`
writes its fields as JSON values and `from_state` reads every field back by its declared type
(nested dataclasses such as `StageResult` included). Saving and restoring are the same field
list, so they cannot drift apart; a field added here is saved and restored with nothing else to
write. A checkpoint written before a field existed restores that field's default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from stackwise.training.callbacks import StageResult, TrainingResults

_MEMORY_KEYS = ("training_memory_bytes", "cache_memory_bytes", "cache_disk_bytes")


@dataclass
class RunPosition:
    """A run's position (see the module docstring).

    While the run goes on, the trainer keeps the live parts in their own objects (the data
    stream, the stage's meter, the fp16 loss scaler); `stream`, `meter`, `grad_scaler` and
    `wall_time_s` are filled in when a position is captured for a checkpoint. Until then
    `wall_time_s` counts the wall seconds of the run's earlier segments (before a resume).
    """

    config_hash: str
    plan: list[tuple[str, int]]  # (name, steps) of every stage: a resume needs the same plan
    stage_index: int = 0
    step_in_stage: int = 0
    global_step: int = 0
    stream: tuple[int, int] = (0, 0)  # data position (epoch, index) of the training stream
    pool_start: tuple[int, int] | None = None  # where the sample pool was drawn from
    total_tokens: int = 0  # training tokens of the finished stages
    total_flops: float = 0.0  # executed FLOPs of the finished stages
    unique_tokens: int = 0  # distinct training tokens read from the data (first pass)
    wall_time_s: float = 0.0
    meter: dict[str, Any] = field(default_factory=dict)  # `StageMeter.state`: plain numbers
    last_logged_loss: float = math.nan
    loss_window: list[float] = field(default_factory=list)  # losses since the last log
    stage_results: list[StageResult] = field(default_factory=list)
    interrupted: bool = False  # written on Ctrl-C, in the middle of a step
    # fp16 loss scale (plain numbers; empty when no scaler is in use): a resume that
    # restarted from the initial scale would skip different steps on overflow.
    grad_scaler: dict[str, Any] = field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        """The position as JSON values (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunPosition:
        """The position `to_state` wrote, every field read back as its declared type."""
        position = decode(cls, state)
        assert isinstance(position, RunPosition)
        return position

    def results(
        self,
        *,
        training_architecture: str,
        objective: str,
        planned_stages: int,
        final: dict[str, float],
        next_token_perplexity: float | None,
        test: dict[str, float],
        wall_time_s: float,
        peak_memory_bytes: int,
        peak_flops: float | None,
        device: str,
        weights_dir: str | None,
    ) -> TrainingResults:
        """The results of a run that ended here: its stages and totals, with the final
        validation (`final`) and test (`test`) metrics. Rates divide by training seconds."""
        stages = self.stage_results
        train_seconds = sum(r.extra.get("train_time_s", r.wall_time_s) for r in stages)
        return TrainingResults(
            training_architecture=training_architecture,
            objective=objective,
            stages=list(stages),
            final_train_loss=stages[-1].train_loss,
            final_val_loss=final.get("val/loss"),
            final_val_perplexity=final.get("val/perplexity"),
            next_token_perplexity=next_token_perplexity,
            final_test_loss=test.get("test/loss"),
            total_steps=self.global_step,
            total_tokens=self.total_tokens,
            wall_time_s=wall_time_s,
            tokens_per_s=self.total_tokens / max(train_seconds, 1e-9),
            peak_memory_bytes=peak_memory_bytes,
            flops=self.total_flops,
            mfu=(
                None
                if peak_flops is None
                else self.total_flops / max(train_seconds, 1e-9) / peak_flops
            ),
            device=device,
            extra={
                **_largest_memory(stages),
                "stages": float(planned_stages),
                "tokens_seen": float(self.total_tokens),
                "unique_tokens": float(self.unique_tokens),
                "train_time_s": train_seconds,
            },
            weights_dir=weights_dir,
        )


def _largest_memory(stages: list[StageResult]) -> dict[str, float]:
    """A run's memory in parts: the largest of its stages' (where they were measured)."""
    return {
        key: max(s.extra[key] for s in stages if key in s.extra)
        for key in _MEMORY_KEYS
        if any(key in s.extra for s in stages)
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def decode(kind: Any, value: Any) -> Any:
    """`value` (JSON: dicts, lists, numbers, strings, None) as an instance of the type `kind`:
    a dataclass (from a dict of its fields; missing fields take their defaults), a list,
    a fixed-length tuple, a dict, an optional, int, float, str, bool or Any."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union or origin is types.UnionType:
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return decode(inner, value)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        hints = typing.get_type_hints(kind)
        given = {
            f.name: decode(hints[f.name], value[f.name])
            for f in dataclasses.fields(kind)
            if f.name in value
        }
        return kind(**given)
    if origin is list:
        return [decode(args[0], item) for item in value]
    if origin is tuple:
        if len(args) != len(value):
            raise ValueError(f"expected {len(args)} values for {kind}, got {value!r}")
        return tuple(decode(a, item) for a, item in zip(args, value, strict=True))
    if origin is dict:
        return {decode(args[0], k): decode(args[1], v) for k, v in value.items()}
    if kind is Any:
        return value
    if kind in (int, float, str, bool):
        return kind(value)
    raise TypeError(f"cannot read a {kind!r} from a checkpoint")
