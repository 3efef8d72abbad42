"""Training speed of a StackWise causal GQA Rack versus Hugging Face `LlamaForCausalLM`.

Both models have the same shape: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases,
tied embeddings, and the same width, heads, K/V heads, FFN width, depth and vocabulary (their
parameter counts are checked to be equal). Llama uses ``attn_implementation="sdpa"``. One
training step is forward + cross-entropy + backward + AdamW step. The two models alternate in
repeated timing rounds within one process; the per-step medians give the ratio

    speed_ratio = stackwise steps/s / llama steps/s     (>= 1.0: StackWise is at least as fast)

(``speed_ratio_best_round`` compares each model's fastest round instead, which is less
affected by other work on a shared machine; ``--clock thread_cpu`` times CPU seconds of a single
compute thread instead of wall time, for machines that are busy with other work.)

Two shapes by default (``--shapes``): d_model 256 x 4 layers (8 heads, 2 K/V heads, batch 8) and
d_model 512 x 8 layers (8 heads, 2 K/V heads, batch 4), both at seq 256. ``--quick``: one tiny
shape, two rounds (seconds; for tests).

``--device cuda`` runs both models on the GPU (the clock waits for it with
``torch.cuda.synchronize()``; fp32 matmuls on TF32 tensor cores, as the trainer sets them);
``--precision bf16`` runs both forwards and losses under the same
``torch.autocast("cuda", dtype=torch.bfloat16)`` that StackWise's ``training.precision: bf16``
uses.

Printed as JSON and written to ``benchmarks/results/bench_vs_llama.json`` (on CUDA:
``bench_vs_llama_cuda.json``).

    python benchmarks/bench_vs_llama.py [--shapes 256x4,512x8 --seq-len 256 ...]
    python benchmarks/bench_vs_llama.py --device cuda --precision bf16 --shapes 1024x8,2048x8

Needs the `bench` extra (``pip install -e .[bench]``, i.e. transformers).
Goal: speed_ratio >= 1.0 at both shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import _device
import torch
import torch.nn.functional as F
from _report import headline, publish
from torch import nn

from stackwise.model import create_simple_rack


@dataclass(frozen=True)
class Shape:
    """One compared shape: width, depth, heads, K/V heads and batch size."""

    d_model: int
    layers: int
    n_heads: int
    n_kv_heads: int
    batch_size: int

    @property
    def label(self) -> str:
        return f"{self.d_model}x{self.layers}"


# d_model x layers -> (heads, K/V heads, batch size)
DEFAULT_SHAPES = {(256, 4): (8, 2, 8), (512, 8): (8, 2, 4)}
QUICK_SHAPE = Shape(d_model=32, layers=2, n_heads=4, n_kv_heads=2, batch_size=2)


def parse_shapes(text: str) -> list[Shape]:
    """``"256x4,512x8"`` -> shapes (heads, K/V heads and batch from the defaults above, else
    head width 64, 2 K/V heads, batch 4)."""
    shapes = []
    for item in text.split(","):
        d_model, layers = (int(part) for part in item.lower().split("x"))
        n_heads, n_kv_heads, batch = DEFAULT_SHAPES.get(
            (d_model, layers), (max(2, d_model // 64), 2, 4)
        )
        shapes.append(Shape(d_model, layers, n_heads, n_kv_heads, batch))
    return shapes


def build_llama(shape: Shape, args: argparse.Namespace, d_ff: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=shape.d_model,
        intermediate_size=d_ff,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        max_position_embeddings=args.seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def make_step(
    model: nn.Module,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    args: argparse.Namespace,
) -> Callable[[torch.Tensor], None]:
    """One training step; it does not wait for the GPU (the timing loop synchronizes)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(ids: torch.Tensor) -> None:
        with _device.autocast(args.device, args.precision):
            logits = logits_of(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, args.vocab_size), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def unique_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def compare(shape: Shape, args: argparse.Namespace) -> dict:
    """Interleaved timing rounds of both models at one shape."""
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    rack = create_simple_rack(
        n_stacks=1,
        blocks_per_stack=shape.layers,
        d_model=shape.d_model,
        d_ff=args.d_ff,
        n_heads=shape.n_heads,
        n_kv_heads=shape.n_kv_heads,
        attention_type="gqa",
        attention_mode="causal",
        vocab_size=args.vocab_size,
        tie_embeddings=True,
        seed=0,
    )
    d_ff = rack.blocks[0].spec()["d_ff"]
    torch.manual_seed(0)
    llama = build_llama(shape, args, d_ff)
    counts = {"stackwise": unique_parameter_count(rack), "llama": unique_parameter_count(llama)}
    if counts["stackwise"] != counts["llama"]:
        raise SystemExit(f"parameter counts differ at {shape.label}: {counts}")
    rack.to(args.device)
    llama.to(args.device)

    steps = {
        "stackwise": make_step(rack, rack, args),
        "llama": make_step(llama, lambda ids: llama(input_ids=ids).logits, args),
    }
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(
        0, args.vocab_size, (shape.batch_size, args.seq_len + 1), generator=generator
    ).to(args.device)
    for step in steps.values():
        for _ in range(args.warmup):
            step(batch)

    per_step: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.rounds):
        # Alternate which model goes first so drift in machine speed hits both alike.
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            _device.synchronize(args.device)
            start = clock()
            for _ in range(args.steps):
                steps[name](batch)
            _device.synchronize(args.device)
            per_step[name].append((clock() - start) / args.steps)

    median = {name: statistics.median(times) for name, times in per_step.items()}
    best = {name: min(times) for name, times in per_step.items()}
    steps_per_s = {name: 1.0 / t for name, t in median.items()}
    tokens = shape.batch_size * args.seq_len
    return {
        "shape": {**asdict(shape), "d_ff": d_ff, "seq_len": args.seq_len},
        "speed_ratio": steps_per_s["stackwise"] / steps_per_s["llama"],
        # fastest round of each: less sensitive to other load on a shared machine
        "speed_ratio_best_round": best["llama"] / best["stackwise"],
        "steps_per_s": steps_per_s,
        "tokens_per_s": {name: s * tokens for name, s in steps_per_s.items()},
        "median_step_s": median,
        "step_s_per_round": per_step,
        "parameters": counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="256x4,512x8", help="d_model x layers, comma-separated")
    parser.add_argument("--d-ff", type=int, default=None, help="default: StackWise's rule")
    parser.add_argument("--vocab-size", type=int, default=260)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--clock",
        choices=("wall", "thread_cpu"),
        default="wall",
        help="`thread_cpu`: CPU time of the (single) compute thread, robust to other load on "
        "the machine; implies --threads 1",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="every shape's batch (default: per shape)"
    )
    _device.add_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="one tiny shape, 2 rounds (seconds)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    _device.check(parser, args)
    shapes = parse_shapes(args.shapes)
    if args.batch_size is not None:
        shapes = [replace(shape, batch_size=args.batch_size) for shape in shapes]
    if args.quick:
        shapes, args.seq_len, args.rounds, args.steps, args.warmup = [QUICK_SHAPE], 32, 2, 1, 1
        args.threads = 1
    if args.clock == "thread_cpu":
        args.threads = 1  # CPU backward runs on the calling thread, so one thread sees it all
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    results = {shape.label: compare(shape, args) for shape in shapes}
    on = ""
    if args.device == "cuda":
        on = f", on {torch.cuda.get_device_name()}, {args.precision}" + (
            " autocast" if args.precision == "bf16" else " (TF32 matmuls)"
        )
    rows = [
        headline(
            f"Training speed vs Hugging Face Llama (sdpa), causal GQA, d_model {r['shape']['d_model']}"
            f" x {r['shape']['layers']} layers, seq {args.seq_len}, batch {r['shape']['batch_size']}"
            f", forward + backward + AdamW, interleaved rounds, median{on}",
            f"**{r['speed_ratio']:.2f}x** Llama's steps/s ({r['median_step_s']['stackwise']:.3f} s"
            f" vs {r['median_step_s']['llama']:.3f} s per step; fastest rounds:"
            f" {r['speed_ratio_best_round']:.2f}x)",
            ">= 1.0",
            r["speed_ratio"] >= 1.0,
            ""
            if r["speed_ratio"] >= 1.0
            else f"StackWise's median step is {1 / r['speed_ratio'] - 1:.0%} longer than Llama's "
            f"(fastest rounds: {r['speed_ratio_best_round']:.2f}x); where a StackWise step spends "
            "its time outside matmuls: see the MFU row",
        )
        for r in results.values()
    ]
    result = {
        "benchmark": "bench_vs_llama",
        "shapes": results,
        "speed_ratio": {label: r["speed_ratio"] for label, r in results.items()},
        "goal": "speed_ratio >= 1.0 at every shape",
        "goal_met": all(r["speed_ratio"] >= 1.0 for r in results.values()),
        "config": {
            **vars(args),
            "threads": torch.get_num_threads(),
            "tf32": args.device == "cuda",
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "headline": rows,
    }
    publish("bench_vs_llama", result, args.out, quick=args.quick, device=args.device)


if __name__ == "__main__":
    main()
