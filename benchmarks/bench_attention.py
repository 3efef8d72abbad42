"""Attention types against sequence length: forward + backward time and memory of one attention
module (mha, gqa, mla, kernel with elu and FAVOR+ features), causal, T = 256 ... 4096.

Each point times ``attn(x).sum().backward()`` (best of ``--repeats`` after a warm-up) and, in a
separate pass under `torch.profiler` with memory profiling, the peak of bytes held by tensors
allocated during forward + backward (the input, the module's weights and their gradients from an
earlier pass excluded). Softmax attention (mha, gqa, mla: ``F.scaled_dot_product_attention``)
costs O(T²) time; kernel attention is linear in T, so time(4096)/time(1024) should be about 4.

Run: ``python benchmarks/bench_attention.py [--d-model 256 --n-heads 4 --batch-size 1]``
(``--clock thread_cpu``: one thread timed in its CPU seconds, for a machine busy with other work)
``--quick``: T = 64 and 128 only (seconds; for tests).
Goal: kernel (both feature maps) time(4096) / time(1024) <= 4.5.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _report import headline, publish
from torch import nn

from stackwise.model.architecture import create_block_spec
from stackwise.model.attention import (
    GroupedQueryAttention,
    KernelAttention,
    MultiHeadLatentAttention,
)

KINDS = ("mha", "gqa", "mla", "kernel_elu", "kernel_favor")


def build(kind: str, d_model: int, n_heads: int) -> nn.Module:
    """One causal attention module of `kind`, with the defaults a Block would give it."""
    torch.manual_seed(0)
    common = {"d_model": d_model, "n_heads": n_heads, "attention_mode": "causal"}
    if kind == "mha":
        return GroupedQueryAttention(n_kv_heads=n_heads, **common)
    if kind == "gqa":
        return GroupedQueryAttention(n_kv_heads=max(1, n_heads // 4), **common)
    if kind == "mla":
        spec = create_block_spec(d_model, n_heads=n_heads, attention_type="mla")
        return MultiHeadLatentAttention(
            kv_lora_rank=spec["kv_lora_rank"], qk_rope_head_dim=spec["qk_rope_head_dim"], **common
        )
    feature_map = kind.split("_")[1]
    return KernelAttention(n_kv_heads=n_heads, feature_map=feature_map, **common)


def forward_backward(module: nn.Module, x: torch.Tensor) -> None:
    module(x).sum().backward()


def time_point(module: nn.Module, x: torch.Tensor, repeats: int, clock: Any) -> float:
    forward_backward(module, x)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        module.zero_grad(set_to_none=False)
        x.grad = None
        start = clock()
        forward_backward(module, x)
        best = min(best, clock() - start)
    return best


def peak_bytes(module: nn.Module, x: torch.Tensor) -> int | None:
    """Peak bytes of tensors allocated during one forward + backward: the running sum of the
    profiler's allocation and free records, in time order (None where the profiler keeps none)."""
    from torch.profiler import ProfilerActivity, profile

    module.zero_grad(set_to_none=False)  # gradients already allocated: not counted
    x.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward_backward(module, x)
    records = getattr(prof.profiler, "kineto_results", None)
    if records is None:
        return None
    deltas = sorted(
        (event.start_ns(), event.nbytes())
        for event in records.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def kernel_note(points: dict[str, Any], short: str, long: str) -> str:
    """Per-token time and memory of the kernel attentions at both lengths (their FLOPs per
    token do not depend on the length)."""
    parts = []
    for kind in ("kernel_elu", "kernel_favor"):
        a, b = points[kind][short], points[kind][long]
        parts.append(
            f"{kind}: {a['seconds'] / int(short) * 1e6:.0f} -> "
            f"{b['seconds'] / int(long) * 1e6:.0f} us per token, "
            f"{(a['peak_bytes'] or 0) / 2**20:.0f} -> {(b['peak_bytes'] or 0) / 2**20:.0f} MiB"
        )
    return (
        f"time per token grows with length although the FLOPs per token do not (T={short} -> "
        f"{long}): " + "; ".join(parts)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lengths", default="256,512,1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--clock",
        choices=("wall", "thread_cpu"),
        default="wall",
        help="`thread_cpu`: one thread, timed in its CPU seconds (for busy machines)",
    )
    parser.add_argument("--quick", action="store_true", help="T = 64, 128 only (seconds)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.repeats, args.d_model, args.threads = "64,128", 1, 64, 1
    clock = time.perf_counter
    if args.clock == "thread_cpu":  # backward runs on the calling thread on CPU
        args.threads, clock = 1, time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    points: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for kind in KINDS:
        module = build(kind, args.d_model, args.n_heads)
        points[kind] = {}
        for length in lengths:
            generator = torch.Generator().manual_seed(length)
            x = torch.randn(args.batch_size, length, args.d_model, generator=generator)
            x.requires_grad_(True)
            points[kind][str(length)] = {
                "seconds": time_point(module, x, args.repeats, clock),
                "peak_bytes": peak_bytes(module, x),
            }
    # The goal compares T=4096 with T=1024 (4x longer: 4x the time if linear); a shorter list
    # (quick) compares its longest length with its shortest.
    long = str(lengths[-1])
    short = str(lengths[-1] // 4) if lengths[-1] // 4 in lengths else str(lengths[0])
    ratios = {k: points[k][long]["seconds"] / points[k][short]["seconds"] for k in KINDS}
    # Linear time scales with the length ratio; the goal allows 12.5 % over it (4.5 at 4x).
    limit = 1.125 * int(long) / int(short)
    met = max(ratios["kernel_elu"], ratios["kernel_favor"]) <= limit
    table = "; ".join(
        f"{kind} {points[kind][long]['seconds'] * 1e3:.0f} ms / "
        f"{(points[kind][long]['peak_bytes'] or 0) / 2**20:.0f} MiB"
        for kind in KINDS
    )
    figure = (
        f"kernel time({long})/time({short}): elu **{ratios['kernel_elu']:.2f}**, favor "
        f"**{ratios['kernel_favor']:.2f}** (softmax: mha {ratios['mha']:.2f}, gqa "
        f"{ratios['gqa']:.2f}, mla {ratios['mla']:.2f}); at T={long}: {table}"
    )
    result = {
        "benchmark": "bench_attention",
        "settings": {**vars(args), "threads": torch.get_num_threads(), "mode": "causal"},
        "points": points,
        "time_ratio_long_over_quarter": ratios,
        "lengths_compared": [int(short), int(long)],
        "goal": "kernel time(4096)/time(1024) <= 4.5",
        "goal_limit_for_lengths": limit,
        "goal_met": met,
        "headline": [
            headline(
                f"Attention forward + backward vs sequence length ({args.lengths}), causal, "
                f"d_model {args.d_model}, {args.n_heads} heads, batch {args.batch_size}: time and "
                "peak memory of mha, gqa, mla, kernel (elu, favor)",
                figure,
                f"kernel <= {limit:.2f}",
                met,
                "" if met else kernel_note(points, short, long),
            )
        ],
    }
    publish("bench_attention", result, args.out, quick=args.quick)


if __name__ == "__main__":
    main()
