"""Model FLOPs utilisation (MFU) of rackwise and blockwise training against the machine's own
measured matmul peak, in the same run (on a GPU: against its datasheet peak, the measured one
beside it).

1. Peak: the best FLOP/s of a large square fp32 ``torch.matmul`` (``2·n³`` FLOPs), measured with
   the same thread count before and after the trainings; the higher of the two is the peak, so
   the MFU is never flattered by a slow peak measurement.
2. Training: a rack (d_model >= 512, bidirectional attention and the mlm objective, so every
   counted attention FLOP is executed — no causal kernel skips half of it) trained by the
   real `ArchitectureTrainer`, rackwise and blockwise. MFU = the FLOPs the trainer counts (trainable
   piece 3x forward, readout, trunk forwards that build the cache) / its training seconds /
   the measured peak.
3. Where the time goes: a `torch.profiler` trace of a few rackwise steps, every operator's own
   time attributed to matmul, the attention kernel, attention's other work (RoPE, layout), norms,
   the FFN's element-wise work, residual adds, loss, optimizer, gradient clipping and the rest.
   Backward operators are attributed to the forward module that created them (autograd sequence
   numbers), so "norms" means norm forward + backward.

On a machine busy with other work, ``--clock thread_cpu`` runs everything on one thread and
times CPU seconds of that thread (peak, trainings, the ceiling and the optimizer alike), so
time spent waiting for a core is not counted; the trainings are then timed over the whole
``train_architecture`` call (set-up included), which can only lower the MFU.

On a GPU (``--device cuda [--precision bf16]``) the trainer runs with ``training.device: cuda``
and ``training.precision`` as given (bf16: autocast; fp32: TF32 matmuls, as the trainer sets
them). MFU is then taken against the GPU's dense datasheet peak for that precision
(`stackwise.training.metrics.GPU_PEAK_FLOPS`; TF32 for fp32), and the measured peak of a square
matmul in the same precision is reported beside it (``mfu_vs_measured_peak``); for a GPU missing
from the table, against the measured peak alone. Every timing waits for the GPU
(``torch.cuda.synchronize()``), and the profile attributes CUDA kernel time instead of CPU time.
Results go to ``bench_mfu_cuda.json``.

Run: ``python benchmarks/bench_mfu.py [--d-model 512 --layers 4 --seq-len 256 --batch-size 8]``
``--quick``: a tiny rack, one step of each (seconds; for tests).
Goal: MFU >= 0.8 on CPU at d_model >= 512 (fp32); on a GPU the figure is reported without a goal.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

import _device
import torch
from _report import headline, publish
from torch import nn

import stackwise
from stackwise.config.base import StackWiseConfig
from stackwise.model.architecture import SwiGLU, create_rack_from_config
from stackwise.model.attention import (
    GroupedQueryAttention,
    KernelAttention,
    MultiHeadLatentAttention,
)
from stackwise.model.norm import RMSNorm
from stackwise.training.callbacks import TrainingCallback
from stackwise.training.optim import build_optimizer

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"}
SDPA_PREFIX = "aten::_scaled_dot_product"
LOSS_MARKERS = ("cross_entropy", "nll_loss", "log_softmax", "LogSoftmaxBackward", "NllLoss")
# wall seconds, or CPU seconds of the calling thread with --clock thread_cpu
clock = time.perf_counter
GOAL = 0.8  # MFU against the measured peak, on the CPU

GPU_BATCH = 20  # matmuls per timing on a GPU

CATEGORIES = (
    "matmul",
    "attention kernel (sdpa)",
    "attention other (rope, layout)",
    "norms",
    "ffn element-wise (silu, gate x up)",
    "residual adds and other forward/backward",
    "loss",
    "optimizer (adamw)",
    "gradient clipping and zeroing",
    "trainer and data",
)


def matmul_peak(args: argparse.Namespace, threads: int, repeats: int) -> dict[str, float]:
    """Best FLOP/s of ``a @ b`` for square matrices of side ``--matmul-size``: fp32 on the CPU;
    on a GPU in the training precision (bf16, or fp32 on TF32 tensor cores), each timing over
    `GPU_BATCH` back-to-back products so launch and synchronisation cost next to nothing."""
    torch.set_num_threads(threads)
    size = args.matmul_size
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(args.device, dtype)
    b = torch.randn(size, size, generator=generator).to(args.device, dtype)
    out = torch.empty(size, size, device=args.device, dtype=dtype)
    count = GPU_BATCH if args.device == "cuda" else 1
    torch.matmul(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _device.synchronize(args.device)
        start = clock()
        for _ in range(count):
            torch.matmul(a, b, out=out)
        _device.synchronize(args.device)
        best = min(best, (clock() - start) / count)
    return {"size": size, "best_seconds": best, "flops_per_s": 2.0 * size**3 / best}


def make_config(mode: str, args: argparse.Namespace, steps: int) -> StackWiseConfig:
    return StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": args.d_model,
                "n_heads": max(1, args.d_model // 64),
                "attention_type": "mha",
                "attention_mode": "bidirectional",
                "architecture": {"n_stacks": 1, "blocks_per_stack": args.layers},
            },
            "training": {
                "training_architecture": mode,
                "objective": "mlm",
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "budget": {"steps": steps},
                "device": args.device,
                "precision": args.precision,
                "log_every_steps": 1000,
                "eval": {"batches": 1},
            },
        }
    )


def batches(args: argparse.Namespace, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.seq_len)
    return [torch.randint(0, 256, shape, generator=generator) for _ in range(count)]


def train(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train once (after a short warm-up run) and report FLOPs, training seconds and MFU
    relative to the peak, filled in by the caller."""
    steps = args.steps if mode == "rackwise" else args.steps_per_stage * args.layers
    warm = make_config(mode, args, 1 if mode == "rackwise" else args.layers)
    stackwise.train(warm, batches=batches(args, 1))
    config = make_config(mode, args, steps)
    rack = create_rack_from_config(config)
    data = batches(args, steps)
    start = clock()
    results = stackwise.train(config, batches=data, rack=rack).results
    whole_call = clock() - start
    train_seconds = results.extra["train_time_s"] if args.clock == "wall" else whole_call
    return {
        "mode": mode,
        "steps": results.total_steps,
        "tokens": results.total_tokens,
        "flops": results.flops,
        "train_seconds": train_seconds,
        "flops_per_s": results.flops / train_seconds,
        "parameters": rack.get_parameter_count(),
    }


# -- where the time goes ----------------------------------------------------------------------


def _label_modules(rack: nn.Module) -> list[Any]:
    """Forward hooks that open a profiler range per module kind; returns the hook handles."""
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (RMSNorm, "norms"),
        (
            (GroupedQueryAttention, MultiHeadLatentAttention, KernelAttention),
            "attention other (rope, layout)",
        ),
        (SwiGLU, "ffn element-wise (silu, gate x up)"),
    ]
    handles = []
    for module in rack.modules():
        for kind, label in kinds:
            if isinstance(module, kind):
                ranges: list[Any] = []

                def enter(
                    _m: nn.Module, _a: Any, label: str = label, ranges: list = ranges
                ) -> None:
                    ranges.append(torch.profiler.record_function(f"cat::{label}"))
                    ranges[-1].__enter__()

                def leave(_m: nn.Module, _a: Any, _o: Any, ranges: list = ranges) -> None:
                    ranges.pop().__exit__(None, None, None)

                handles.append(module.register_forward_pre_hook(enter))
                handles.append(module.register_forward_hook(leave))
    return handles


def _category_of_range(names: list[str]) -> str | None:
    """The category of an operator from the names of its enclosing ranges (innermost first)."""
    for name in names:
        if name.startswith("cat::"):
            return name[5:]
        if name.startswith("Optimizer.step"):
            return "optimizer (adamw)"
        if name.startswith("Optimizer.zero_grad"):
            return "gradient clipping and zeroing"
    return None


def profile_breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """Self time of every operator in a few rackwise steps, by category (fractions): CPU time
    on the CPU; on a GPU the time of the CUDA kernels each operator launched."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    on_gpu = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])

    def own_seconds(event: Any) -> float:
        if not on_gpu:
            return event.self_cpu_time_total / 1e6
        # Kernels are attributed to the operator that launched them; the kernel events
        # themselves are skipped so no kernel counts twice.
        if event.device_type != DeviceType.CPU:
            return 0.0
        return event.self_device_time_total / 1e6

    steps = args.profile_steps
    config = make_config("rackwise", args, steps + 1)
    config.training.log_every_steps = 1  # one on_metrics per step: the profiler's step marks
    rack = create_rack_from_config(config)
    handles = _label_modules(rack)
    data = batches(args, steps + 1)

    class StepMarks(TrainingCallback):
        """Moves the profiler on after every optimizer step."""

        def __init__(self, prof: Any) -> None:
            self.prof = prof

        def on_metrics(self, metrics: dict[str, float], step: int) -> None:
            if "train/loss" in metrics:
                self.prof.step()

    # The first step (optimizer state allocation, first-call overheads) is not recorded.
    plan = schedule(wait=1, warmup=0, active=steps, repeat=1)
    with profile(activities=activities, schedule=plan) as prof:
        start = time.perf_counter()
        stackwise.train(config, callbacks=[StepMarks(prof)], batches=data, rack=rack)
        _device.synchronize(args.device)
        wall = time.perf_counter() - start
    for handle in handles:
        handle.remove()

    events = prof.events()
    # Forward operators: category from their enclosing ranges; remember it by sequence number
    # so the backward operators autograd runs for them get the same category.
    by_sequence: dict[int, str] = {}
    parents_of: dict[int, list[str]] = {}

    for event in events:
        names = [parent.name for parent in _parents(event)]
        parents_of[id(event)] = names
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::"):
            category = _category_of_range(names)
            if category is not None:
                by_sequence.setdefault(event.sequence_nr, category)

    seconds: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name.startswith(("cat::", "autograd::engine", "Optimizer.", "ProfilerStep")):
            continue
        own = own_seconds(event)
        if own <= 0:
            continue
        names = parents_of[id(event)]
        if event.name in MATMUL_OPS:
            category = "matmul"
        elif event.name.startswith(SDPA_PREFIX) or any(n.startswith(SDPA_PREFIX) for n in names):
            category = "attention kernel (sdpa)"
        elif any(marker in name for name in (event.name, *names) for marker in LOSS_MARKERS):
            category = "loss"
        elif "_foreach_norm" in event.name or "clamp" in event.name or "_foreach_mul" in event.name:
            category = _category_of_range(names) or "gradient clipping and zeroing"
        else:
            category = _category_of_range(names) or ""
            if not category:
                backward = next(
                    (p for p in _parents(event) if p.name.startswith("autograd::engine")), None
                )
                if backward is not None:
                    category = by_sequence.get(
                        backward.sequence_nr, "residual adds and other forward/backward"
                    )
                elif event.sequence_nr >= 0:
                    category = "residual adds and other forward/backward"
                else:
                    category = "trainer and data"
        seconds[category] += own
    total = sum(seconds.values())

    def self_total(e: Any) -> float:
        return e.self_device_time_total if on_gpu else e.self_cpu_time_total

    return {
        "steps_recorded": steps,
        "time_measured": "CUDA kernel time" if on_gpu else "CPU operator self time",
        "wall_seconds_whole_run": wall,
        "operator_seconds": total,
        "fractions": {c: seconds.get(c, 0.0) / total for c in CATEGORIES},
        "top_operators": [
            {"name": e.key, "self_seconds": self_total(e) / 1e6, "calls": e.count}
            for e in sorted(prof.key_averages(), key=self_total, reverse=True)[:12]
        ],
    }


def matmul_ceiling(args: argparse.Namespace, peak: float) -> dict[str, Any]:
    """Forward + backward of every linear layer of the rack at the training shapes (tokens x
    in -> out, ``6·tokens·in·out`` FLOPs), timed alone: the FLOP/s the model's matmuls reach,
    as a fraction of the square-matmul peak. MFU cannot exceed it by much (attention adds a few
    FLOPs at a similar rate; everything else adds time only)."""
    config = make_config("rackwise", args, 1)
    rack = create_rack_from_config(config)
    tokens = args.batch_size * args.seq_len
    shapes = [tuple(m.weight.shape) for m in rack.modules() if isinstance(m, nn.Linear)]
    generator = torch.Generator().manual_seed(0)
    seconds = flops = 0.0
    for out_features, in_features in sorted(set(shapes)):
        count = shapes.count((out_features, in_features))
        weight = torch.randn(out_features, in_features, generator=generator).to(args.device)
        x = torch.randn(tokens, in_features, generator=generator).to(args.device)
        grad = torch.randn(tokens, out_features, generator=generator).to(args.device)
        weight.requires_grad_(True)
        x.requires_grad_(True)
        best = float("inf")
        for _ in range(3 if args.device == "cpu" else 5):
            _device.synchronize(args.device)
            start = clock()
            with _device.autocast(args.device, args.precision):
                out = torch.nn.functional.linear(x, weight)
            out.backward(grad.to(out.dtype))
            _device.synchronize(args.device)
            best = min(best, clock() - start)
        seconds += count * best
        flops += count * 6.0 * tokens * in_features * out_features
    return {"flops_per_s": flops / seconds, "fraction_of_peak": flops / seconds / peak}


def optimizer_step_seconds(args: argparse.Namespace) -> dict[str, Any]:
    """One AdamW step over the rack's parameters: as the trainer builds it on the device, and
    PyTorch's other implementations beside it (the per-tensor loop, ``foreach`` and ``fused``),
    best of 5 each; ``fused`` says whether the trainer's is the fused kernel."""
    config = make_config("rackwise", args, 1)
    rack = create_rack_from_config(config).to(args.device)
    params = [p for p in rack.parameters() if p.requires_grad]
    for param in params:
        param.grad = torch.randn_like(param)
    device = torch.device(args.device)
    configured = build_optimizer(params, config.training.optimizer, 1e-4, device)
    variants = {
        "as_configured": configured,
        "loop": torch.optim.AdamW(params, lr=1e-4, foreach=False, fused=False),
        "foreach": torch.optim.AdamW(params, lr=1e-4, foreach=True),
        "fused": torch.optim.AdamW(params, lr=1e-4, fused=True),
    }
    times: dict[str, Any] = {}
    for name, optimizer in variants.items():
        optimizer.step()  # allocates the moments
        best = float("inf")
        for _ in range(5):
            _device.synchronize(args.device)
            start = clock()
            optimizer.step()
            _device.synchronize(args.device)
            best = min(best, clock() - start)
        times[name] = best
    times["configured_is_fused"] = bool(configured.defaults.get("fused"))
    return times


def optimizer_row(optimizer: dict[str, Any], rack_step: float, against: str) -> dict[str, Any]:
    """The README row of the optimizer step: fused where PyTorch has the kernel."""
    fused = optimizer["configured_is_fused"]
    return headline(
        f"AdamW step over the rackwise rack's parameters ({against}), best of 5: the trainer's "
        "against PyTorch's per-tensor loop and foreach implementations",
        f"{'fused' if fused else 'not fused'}: **{optimizer['as_configured'] * 1e3:.1f} ms** "
        f"(loop {optimizer['loop'] * 1e3:.1f} ms, foreach {optimizer['foreach'] * 1e3:.1f} ms, "
        f"{optimizer['loop'] / optimizer['as_configured']:.1f}x faster than the loop); "
        f"{optimizer['as_configured'] / rack_step:.1%} of a {rack_step:.2f} s rackwise step",
        "fused where available",
        fused,
        "" if fused else "the trainer does not use the fused kernel on this device",
    )


def _parents(event: Any) -> list[Any]:
    parents = []
    parent = event.cpu_parent
    while parent is not None:
        parents.append(parent)
        parent = parent.cpu_parent
    return parents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="rackwise optimizer steps")
    parser.add_argument("--steps-per-stage", type=int, default=4, help="blockwise")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's default")
    parser.add_argument(
        "--clock",
        choices=("wall", "thread_cpu"),
        default="wall",
        help="`thread_cpu`: one thread, timed in its CPU seconds (for busy machines)",
    )
    _device.add_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="tiny rack, one step (seconds)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    _device.check(parser, args)
    if args.quick:
        args.d_model, args.layers, args.seq_len, args.batch_size = 64, 2, 32, 2
        args.steps, args.steps_per_stage, args.profile_steps, args.matmul_size = 1, 1, 1, 256
        args.threads = 1
    global clock
    if args.clock == "thread_cpu":
        args.threads, clock = 1, time.thread_time
    threads = args.threads or torch.get_num_threads()
    repeats = 3 if args.quick else 8
    peak_before = matmul_peak(args, threads, repeats)
    runs = {mode: train(mode, args) for mode in ("rackwise", "blockwise")}
    peak_after = matmul_peak(args, threads, repeats)
    measured = max(peak_before["flops_per_s"], peak_after["flops_per_s"])
    datasheet = _device.datasheet_peak(args.device, args.precision)
    # On a GPU in the table: its datasheet peak; otherwise the measured one.
    peak = datasheet["flops_per_s"] if datasheet else measured
    goal = GOAL if args.device == "cpu" else None
    for run in runs.values():
        run["mfu"] = run["flops_per_s"] / peak
        run["mfu_vs_measured_peak"] = run["flops_per_s"] / measured
    ceiling = matmul_ceiling(args, measured)
    optimizer = optimizer_step_seconds(args)
    rack_step = runs["rackwise"]["train_seconds"] / runs["rackwise"]["steps"]
    breakdown = profile_breakdown(args)
    fractions = breakdown["fractions"]
    not_matmul = sorted(
        ((c, f) for c, f in fractions.items() if c != "matmul"), key=lambda x: -x[1]
    )[:4]
    note = (
        f"the model's own matmul shapes reach {ceiling['fraction_of_peak']:.2f} of the square-"
        f"matmul peak even alone; operator time in rackwise steps: matmul "
        f"{fractions['matmul']:.0%}, "
        + ", ".join(f"{c} {f:.0%}" for c, f in not_matmul)
        + " (memory-bound passes that run far below the peak)"
    )
    if args.device == "cpu":
        against = (
            f"fp32, against the machine's measured matmul peak ({measured / 1e9:.0f} GFLOP/s, "
            f"{args.matmul_size}² matmul, {threads} threads"
            + (", CPU-time clock" if args.clock == "thread_cpu" else "")
            + ")"
        )
    else:
        name = torch.cuda.get_device_name()
        kind = "bf16 autocast" if args.precision == "bf16" else "fp32 (TF32 matmuls)"
        measured_text = f"measured {args.matmul_size}² matmul peak {measured / 1e12:.0f} TFLOP/s"
        against = (
            f"{kind}, on {name}, against its datasheet dense "
            f"{datasheet['precision']} peak ({peak / 1e12:.0f} TFLOP/s; {measured_text})"
            if datasheet
            else f"{kind}, on {name} (not in the datasheet table), against the {measured_text}"
        )

    def figure(run: dict[str, Any]) -> str:
        if args.device == "cpu":
            return f"**{run['mfu']:.2f}** ({run['flops_per_s'] / 1e9:.0f} GFLOP/s executed)"
        return (
            f"**{run['mfu']:.2f}** ({run['flops_per_s'] / 1e12:.1f} TFLOP/s executed; "
            f"{run['mfu_vs_measured_peak']:.2f} of the measured peak)"
        )

    def met(run: dict[str, Any]) -> bool | None:
        return None if goal is None else run["mfu"] >= goal

    rows = [
        headline(
            f"MFU, {mode}, d_model {args.d_model} x {args.layers} blocks, seq {args.seq_len}, "
            f"batch {args.batch_size}, {against}",
            figure(runs[mode]),
            None if goal is None else f">= {goal}",
            met(runs[mode]),
            note if met(runs[mode]) is False else "",
        )
        for mode in runs
    ]
    where = f"d_model {args.d_model} x {args.layers} blocks, {args.device}, {threads} threads"
    rows.append(optimizer_row(optimizer, rack_step, where))
    result = {
        "benchmark": "bench_mfu",
        "settings": vars(args),
        "threads": threads,
        "peak": {
            "before": peak_before,
            "after": peak_after,
            "flops_per_s": peak,
            "measured_flops_per_s": measured,
            "datasheet": datasheet,
        },
        "runs": runs,
        "mfu": {mode: run["mfu"] for mode, run in runs.items()},
        "matmul_ceiling": ceiling,
        "optimizer_step_seconds": optimizer,
        "rackwise_step_seconds": rack_step,
        "profile": breakdown,
        "goal": None if goal is None else f"MFU >= {goal} (fp32, CPU, d_model >= 512)",
        "goal_met": None if goal is None else all(met(run) for run in runs.values()),
        "headline": rows,
    }
    publish("bench_mfu", result, args.out, quick=args.quick, device=args.device)


if __name__ == "__main__":
    main()
