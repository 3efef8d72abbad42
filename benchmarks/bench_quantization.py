"""Frozen pieces held in fp32, bf16 or int8 (weight-only, torchao) while they are re-run.

With ``depthwise.data: fresh`` every stage runs the frozen trunk on new batches, so the trunk's
weights must stay in memory; ``training.frozen_precision`` holds them in less. This trains the
same blockwise run three times — frozen pieces in fp32, bf16 and int8 — and reports the final
validation loss of each, its difference to fp32, the frozen trunk's weight bytes and the time
per run (same process, interleaved order, median of the repeats).

Run: ``python benchmarks/bench_quantization.py [--repeats 2]``
``--quick``: a tiny rack, one repeat (seconds; for tests).
Goal: int8 within 0.01 nats of fp32 at half the trunk's bf16 bytes.
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

BYTES = {"fp32": 4, "bf16": 2, "int8": 1}


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
    linear = sum(
        m.weight.numel()
        for block in rack.blocks[:-1]
        for m in block.modules()
        if isinstance(m, torch.nn.Linear)
    )
    start = time.perf_counter()
    results = stackwise.train(config, data=data, rack=rack).results
    seconds = time.perf_counter() - start
    assert results.final_val_loss is not None
    return results.final_val_loss, seconds, linear * BYTES[precision]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--steps-per-stage", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=400_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny rack (seconds)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.blocks, args.steps_per_stage = 32, 2, 3
        args.batch_size, args.seq_len, args.max_tokens, args.repeats = 2, 32, 20_000, 1

    losses: dict[str, float] = {}
    times: dict[str, list[float]] = {p: [] for p in BYTES}
    trunk_bytes: dict[str, int] = {}
    for repeat in range(args.repeats):
        order = list(BYTES) if repeat % 2 == 0 else list(reversed(BYTES))
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
        for precision in BYTES
    }
    int8 = rows["int8"]
    report = {
        "benchmark": "bench_quantization",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "quick")},
        "results": rows,
        "headline": [
            headline(
                "frozen trunk in int8 (weight-only, torchao) vs fp32, blockwise with fresh data",
                f"{int8['loss_minus_fp32']:+.4f} nats, {int8['trunk_linear_bytes'] / 1e6:.1f} MB"
                f" vs {rows['fp32']['trunk_linear_bytes'] / 1e6:.1f} MB, "
                f"{int8['time_vs_fp32']:.2f}x the time",
                "|Δ loss| ≤ 0.01",
                abs(int8["loss_minus_fp32"]) <= 0.01,
                ""
                if abs(int8["loss_minus_fp32"]) <= 0.01
                else "int8 weight rounding of the trunk shifts the cached activations",
            )
        ],
    }
    publish("bench_quantization", report, args.out, quick=args.quick)


if __name__ == "__main__":
    main()
