"""Blockwise training time versus depth (4, 8, 16 blocks), with and without the cache.

Every stage gets the same budget (``--steps-per-stage`` optimizer steps), so the trainable work
grows linearly with depth. With the activation cache the frozen trunk costs one forward pass of
each newly frozen block over the sample pool per stage, so the whole run stays linear in depth
(ideal time(16)/time(8) = 2). Without it, stage k reruns k frozen blocks on every step, which is
quadratic in depth. Evaluation is off so only training is timed.

Run: ``python benchmarks/bench_depth.py [--steps-per-stage 4]``
``--quick``: depths 1, 2, 4 of a tiny rack, one run each (seconds; for tests).
Goal: time(16) / time(8) <= 2.2 with the cache.
"""

from __future__ import annotations

import argparse

import torch
from _report import headline, publish

import stackwise
from stackwise.config.base import StackWiseConfig


def time_run(n_blocks: int, cached: bool, args: argparse.Namespace) -> float:
    config = StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": args.d_model,
                "n_heads": max(1, args.d_model // 64),
                "architecture": {"n_stacks": 1, "blocks_per_stack": n_blocks},
                "attention_mode": "bidirectional",
            },
            "training": {
                "training_architecture": "blockwise",
                "objective": "mlm",
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "budget": {"steps": args.steps_per_stage * n_blocks},
                "device": "cpu",
                "log_every_steps": 1000,
                "cache": {"enabled": cached},
            },
        }
    )
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.seq_len)
    batches = [torch.randint(0, 256, shape, generator=generator) for _ in range(16)]
    return stackwise.train(config, batches=batches).results.wall_time_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-stage", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per point")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable on shared machines)"
    )
    parser.add_argument("--quick", action="store_true", help="depths 1, 2, 4 (seconds)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    depths = (4, 8, 16)
    if args.quick:
        depths, args.repeats, args.steps_per_stage = (1, 2, 4), 1, 1
        args.d_model, args.seq_len, args.batch_size = 32, 32, 2
    torch.set_num_threads(args.threads)
    time_run(2, True, args)  # warm-up: first-call overheads (imports, allocator)
    times: dict[str, dict[str, float]] = {"cached": {}, "uncached": {}}
    for depth in depths:
        for label, cached in (("cached", True), ("uncached", False)):
            runs = [time_run(depth, cached, args) for _ in range(args.repeats)]
            times[label][str(depth)] = min(runs)
    small, middle, large = (str(d) for d in depths)
    ratios = {label: t[large] / t[middle] for label, t in times.items()}
    met = ratios["cached"] <= 2.2
    report = {
        "benchmark": "bench_depth",
        "settings": vars(args),
        "depths": list(depths),
        "wall_time_s": times,
        "time16_over_time8": ratios,
        "time8_over_time4": {label: t[middle] / t[small] for label, t in times.items()},
        "goal": "cached time(16)/time(8) <= 2.2",
        "goal_met": met,
        "headline": [
            headline(
                f"Blockwise training time vs depth ({small} / {middle} / {large} blocks, same "
                f"per-stage budget), d_model {args.d_model}, seq {args.seq_len}, batch "
                f"{args.batch_size}, with and without the activation cache",
                " / ".join(f"{t:.2f}" for t in times["cached"].values())
                + f" s: **time({large})/time({middle}) = {ratios['cached']:.2f}** (uncached: "
                + " / ".join(f"{t:.2f}" for t in times["uncached"].values())
                + f" s, ratio {ratios['uncached']:.2f})",
                "<= 2.2 cached",
                met,
                ""
                if met
                else "with the cache the run is linear in depth (ideal 2.0); the excess is the "
                "per-stage fixed cost (optimizer set-up, cache extension) and machine noise",
            )
        ],
    }
    publish("bench_depth", report, args.out, quick=args.quick)


if __name__ == "__main__":
    main()
