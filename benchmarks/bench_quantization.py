"""Frozen pieces held in fp32, bf16 or int8 (weight-only) while they are re-run.

With ``depthwise.data: fresh`` every stage runs the frozen trunk on new batches, so the trunk's
weights must stay in memory; ``training.frozen_precision`` holds them in less. This trains the
same blockwise run three times — frozen pieces in fp32, bf16 and int8 — and reports the final
validation loss of each, its difference to fp32, the bytes the frozen trunk's linear layers are
held in (int8: one byte per weight and a 4-byte scale per output row) and the time per run
(same process, interleaved order, median of the repeats), and which low-memory precision is the
faster one on this machine (bf16 matmuls are fast on CPUs with native bf16 instructions and
slow elsewhere; int8 runs fp32 matmuls on weights multiplied back out).

Run: ``python benchmarks/bench_quantization.py [--repeats 2] [--clock thread_cpu]``
(``thread_cpu``: one thread, timed in CPU seconds, for a machine busy with other work)
``--quick``: a tiny rack, one repeat (seconds; for tests).
Goal: int8 within 0.01 nats of fp32, at most 1.2x its time.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from _report import headline, publish

import stackwise
from stackwise.config.base import StackWiseConfig
from stackwise.data import build_data
from stackwise.model.architecture import create_rack_from_config

PRECISIONS = ("fp32", "bf16", "int8")
TIME_GOAL = 1.2  # int8 time / fp32 time
LOSS_GOAL = 0.01  # |int8 loss - fp32 loss|, nats
clock = time.perf_counter


def held_bytes(precision: str, weights: list[torch.Tensor]) -> int:
    """Bytes of the frozen linear weights `weights` held in `precision`."""
    if precision == "int8":  # int8 rows and one fp32 scale per row
        return sum(w.numel() + 4 * w.shape[0] for w in weights)
    return sum(w.numel() * (4 if precision == "fp32" else 2) for w in weights)


def run(precision: str, args: argparse.Namespace) -> tuple[float, float, int]:
    config = StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": args.d_model,
                "n_heads": max(1, args.d_model // 64),
                "architecture": {"n_stacks": 1, "blocks_per_stack": args.blocks},
            },
            "training": {
                "training_architecture": "blockwise",
                "frozen_precision": precision,
                "depthwise": {"data": "fresh"},
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "budget": {"steps": args.steps_per_stage * args.blocks},
                "optimizer": {"lr": 2e-3},
                "eval": {"batches": 4},
                "log_every_steps": 1000,
                "device": "cpu",
            },
            "data": {"max_tokens": args.max_tokens},
        }
    )
    # As measured from the start: no final test evaluation.
    data = dataclasses.replace(build_data(config.data, config.training), test_loader=None)
    rack = create_rack_from_config(config)
    # Weights of the linear layers the trunk holds in the last stage (all blocks but one).
    linear = [
        m.weight
        for block in rack.blocks[:-1]
        for m in block.modules()
        if type(m) is torch.nn.Linear
    ]
    start = clock()
    results = stackwise.train(config, data=data, rack=rack).results
    seconds = clock() - start
    assert results.final_val_loss is not None
    return results.final_val_loss, seconds, held_bytes(precision, linear)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--steps-per-stage", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=400_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=("wall", "thread_cpu"),
        default="wall",
        help="`thread_cpu`: one thread, timed in its CPU seconds (for busy machines)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny rack (seconds)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.blocks, args.steps_per_stage = 32, 2, 3
        args.batch_size, args.seq_len, args.max_tokens, args.repeats = 2, 32, 20_000, 1
    if args.clock == "thread_cpu":  # backward runs on the calling thread on a CPU
        global clock
        clock = time.thread_time
        torch.set_num_threads(1)

    losses: dict[str, float] = {}
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    trunk_bytes: dict[str, int] = {}
    for repeat in range(args.repeats):
        order = list(PRECISIONS) if repeat % 2 == 0 else list(reversed(PRECISIONS))
        for precision in order:
            loss, seconds, held = run(precision, args)
            losses[precision] = loss  # deterministic: the same in every repeat
            times[precision].append(seconds)
            trunk_bytes[precision] = held
    rows = {
        precision: {
            "final_val_loss": losses[precision],
            "loss_minus_fp32": losses[precision] - losses["fp32"],
            "trunk_linear_bytes": trunk_bytes[precision],
            "seconds_median": statistics.median(times[precision]),
            "time_vs_fp32": statistics.median(times[precision]) / statistics.median(times["fp32"]),
        }
        for precision in PRECISIONS
    }
    int8, bf16 = rows["int8"], rows["bf16"]
    close = abs(int8["loss_minus_fp32"]) <= LOSS_GOAL
    fast = int8["time_vs_fp32"] <= TIME_GOAL
    faster = min(("int8", "bf16"), key=lambda p: rows[p]["time_vs_fp32"])
    notes = []
    if not close:
        notes.append("int8 weight rounding of the trunk shifts its output")
    if not fast:
        notes.append("dequantizing each weight per forward costs more than the matmul here")
    report = {
        "benchmark": "bench_quantization",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "quick")},
        "results": rows,
        "faster_low_memory_precision": faster,
        "goal": f"int8 |loss - fp32| <= {LOSS_GOAL} nats and time <= {TIME_GOAL}x fp32",
        "goal_met": close and fast,
        "headline": [
            headline(
                "Frozen trunk held in int8 (weight-only) and bf16 vs fp32, blockwise with fresh "
                f"data (the trunk re-run every step), d_model {args.d_model} x {args.blocks} "
                "blocks",
                f"int8: {int8['loss_minus_fp32']:+.4f} nats, "
                f"{int8['trunk_linear_bytes'] / 1e6:.1f} MB vs "
                f"{rows['fp32']['trunk_linear_bytes'] / 1e6:.1f} MB, "
                f"**{int8['time_vs_fp32']:.2f}x** the time; bf16: {bf16['loss_minus_fp32']:+.4f}"
                f" nats, {bf16['trunk_linear_bytes'] / 1e6:.1f} MB, "
                f"{bf16['time_vs_fp32']:.2f}x the time; faster here: {faster}",
                f"int8 |Δ loss| ≤ {LOSS_GOAL}, time ≤ {TIME_GOAL}x",
                close and fast,
                "; ".join(notes),
            )
        ],
    }
    publish("bench_quantization", report, args.out, quick=args.quick)


if __name__ == "__main__":
    main()
