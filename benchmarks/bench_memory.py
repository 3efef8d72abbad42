"""Peak training memory: rackwise, stackwise and blockwise for the same 12-block rack (3 stacks
of 4 blocks).

Each mode runs in a fresh subprocess (so one mode's allocations cannot hide the other's). The
figure compared is the increase of the process's peak resident set size (VmHWM) over its size
just before training starts — the rack's weights and the data are already loaded at that point,
so the delta is what training itself adds: gradients, AdamW moments, activations, the activation
cache. With ``--device cuda`` the modes train on the GPU and the figure compared is the
trainer's own `peak_memory_bytes` there: ``torch.cuda.max_memory_allocated``, reset as each stage
starts, the largest over the stages (everything on the GPU counts, the rack's weights included);
it is written to ``bench_memory_cuda.json``. On the CPU that figure is reported as well.

Every stage gets ``--steps-per-stage`` steps; a depth-wise run's sample pool is that many
micro-batches, so its activation cache is real (8 micro-batches of 2 x 512 x 512 fp32: 16 MiB).

Run: ``python benchmarks/bench_memory.py [--steps-per-stage 8] [--batch-size 2] [--device cuda]``
``--quick``: a tiny rack, 2 steps per stage (seconds; for tests).
Goal: blockwise <= 0.25 x rackwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import _device
import torch
from _report import headline, publish

MODES = ("rackwise", "stackwise", "blockwise")
# the figure compared, per device
FIGURE = {"cpu": "peak_rss_delta_bytes", "cuda": "trainer_peak_memory_bytes"}


def measure(
    mode: str, steps_per_stage: int, batch_size: int, seq_len: int, d_model: int, device: str
) -> dict:
    import stackwise
    from stackwise.config.base import StackWiseConfig
    from stackwise.model.architecture import create_rack_from_config
    from stackwise.training.metrics import current_rss_bytes, peak_rss_bytes

    n_blocks, n_stacks = 12, 3
    stages = {"rackwise": 1, "stackwise": n_stacks, "blockwise": n_blocks}[mode]
    steps = steps_per_stage * stages
    config = StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": d_model,
                "n_heads": d_model // 64,
                "architecture": {"n_stacks": n_stacks, "blocks_per_stack": n_blocks // n_stacks},
            },
            "training": {
                "training_architecture": mode,
                "objective": "clm",
                "batch_size": batch_size,
                "seq_len": seq_len,
                "budget": {"steps": steps},
                "device": device,
                "log_every_steps": 1000,
            },
        }
    )
    rack = create_rack_from_config(config)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, 256, (batch_size, seq_len), generator=generator) for _ in range(steps)
    ]
    baseline = current_rss_bytes()
    results = stackwise.train(config, batches=batches, rack=rack).results
    return {
        "mode": mode,
        "peak_rss_delta_bytes": peak_rss_bytes() - baseline,
        "baseline_rss_bytes": baseline,
        "trainer_peak_memory_bytes": results.peak_memory_bytes,
        "steps": results.total_steps,
        "wall_time_s": results.wall_time_s,
        "parameters": rack.get_parameter_count(),
        "cache_bytes": max([s.extra.get("cache_bytes", 0.0) for s in results.stages]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-stage", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--child", choices=MODES, default=None)
    _device.add_arguments(parser, precision=False)
    parser.add_argument("--quick", action="store_true", help="tiny rack, 2 steps per stage")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    _device.check(parser, args)
    if args.quick:
        args.steps_per_stage, args.seq_len, args.d_model = 2, 64, 64
    shape = (args.steps_per_stage, args.batch_size, args.seq_len, args.d_model, args.device)
    if args.child is not None:
        print(json.dumps(measure(args.child, *shape)))
        return
    runs = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--child", mode]
        command += ["--steps-per-stage", str(args.steps_per_stage)]
        command += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        command += ["--d-model", str(args.d_model), "--device", args.device]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs[mode] = json.loads(output.strip().splitlines()[-1])
    key = FIGURE[args.device]
    rackwise = runs["rackwise"][key]
    ratio = runs["blockwise"][key] / rackwise
    stackwise_ratio = runs["stackwise"][key] / rackwise
    if args.device == "cpu":
        measure_text = "peak RSS increase during training, fresh process per mode (CPU)"
        how = "peak RSS increase, fresh process per mode"
    else:
        measure_text = (
            "torch.cuda.max_memory_allocated during training (largest over the stages), "
            "fresh process per mode"
        )
        how = (
            "CUDA max_memory_allocated, largest stage, fresh process per mode, on "
            + torch.cuda.get_device_name()
        )
    report = {
        "benchmark": "bench_memory",
        "rack": {"n_blocks": 12, "d_model": args.d_model, "seq_len": args.seq_len},
        "batch_size": args.batch_size,
        "steps_per_stage": args.steps_per_stage,
        "measure": measure_text,
        "figure_key": key,
        "runs": runs,
        "blockwise_over_rackwise": ratio,
        "stackwise_over_rackwise": stackwise_ratio,
        "goal": "<= 0.25",
        "goal_met": ratio <= 0.25,
        "headline": [
            headline(
                f"Peak training memory, 12-block rack (3 stacks of 4), d_model {args.d_model}, "
                f"seq {args.seq_len}, batch {args.batch_size}, {args.steps_per_stage} steps per "
                f"stage ({how})",
                f"blockwise **{ratio:.2f}x** rackwise, stackwise {stackwise_ratio:.2f}x ("
                + ", ".join(f"{m} {r[key] / 1e9:.2f} GB" for m, r in runs.items())
                + f"; blockwise cache {runs['blockwise']['cache_bytes'] / 2**20:.0f} MiB)",
                "blockwise <= 0.25",
                ratio <= 0.25,
                ""
                if ratio <= 0.25
                else "every block's weights stay in memory during blockwise training "
                "(out-of-core training is not built yet), and the readout trains with each piece",
            )
        ],
    }
    publish("bench_memory", report, args.out, quick=args.quick, device=args.device)


if __name__ == "__main__":
    main()
