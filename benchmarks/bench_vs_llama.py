"""Training speed of a StackWise causal GQA Rack versus Hugging Face `LlamaForCausalLM`.

Both models have the same shape: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases,
tied embeddings, and the same width, heads, K/V heads, FFN width, depth and vocabulary (their
parameter counts are checked to be equal). Llama uses ``attn_implementation="sdpa"``. One
training step is each side's default training path: forward + cross-entropy + backward,
gradient clipping to norm 1 and a fused AdamW step (StackWise's `build_optimizer`, with weight
decay on matrices only; Hugging Face's Trainer default, ``adamw_torch_fused``). The models
alternate in repeated timing rounds within one process; the per-step medians give the ratio

    speed_ratio = stackwise steps/s / llama steps/s     (>= 1.0: StackWise is at least as fast)

(``speed_ratio_best_round`` compares each model's fastest round instead, which is less
affected by other work on a shared machine; ``--clock thread_cpu`` times CPU seconds of a single
compute thread instead of wall time, for machines that are busy with other work.)

Compiled (``--compiled``, the default in full mode): both models are also wrapped in
``torch.compile`` (compiled before timing, warm-up steps included) and timed in the same
rounds, so the table shows StackWise eager against Llama compiled and what each side gains from
compilation. Ceiling: a `torch.profiler` trace of Llama's eager step gives the share of its time
in the kernels both models run alike (matmuls and the SDPA attention kernel); StackWise cannot be
faster than ``1 / that share`` without dropping work, which is what the goal is read against.

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
Goal: speed_ratio >= 1.25 at both shapes (StackWise eager vs Llama eager).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import _device
import torch
import torch.nn.functional as F
from _report import headline, publish
from torch import nn

from stackwise.config.base import OptimizerConfig
from stackwise.model import create_simple_rack
from stackwise.training.optim import build_optimizer

GOAL = 1.25  # StackWise eager steps/s over Llama eager steps/s
SHARED_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product")


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


def stackwise_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """StackWise's default: fused AdamW, weight decay on matrices only."""
    return build_optimizer(model.parameters(), OptimizerConfig(), 1e-4, torch.device(args.device))


def llama_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Hugging Face Trainer's default (``adamw_torch_fused``, no weight decay)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def make_step(
    model: nn.Module,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
) -> Callable[[torch.Tensor], None]:
    """One training step; it does not wait for the GPU (the timing loop synchronizes)."""
    parameters = list(model.parameters())

    def step(ids: torch.Tensor) -> None:
        with _device.autocast(args.device, args.precision):
            logits = logits_of(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, args.vocab_size), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

    return step


def shared_kernel_share(step: Callable[[torch.Tensor], None], batch: torch.Tensor) -> float:
    """Share of a step's operator time spent in matmuls and the SDPA kernel (profiled)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if batch.is_cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(2):
            step(batch)
    attr = "self_device_time_total" if batch.is_cuda else "self_cpu_time_total"
    times = {event.key: getattr(event, attr) for event in prof.key_averages()}
    total = sum(times.values())
    shared = sum(t for key, t in times.items() if key.startswith(SHARED_OPS))
    return shared / total if total else 0.0


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
        "stackwise": make_step(rack, rack, stackwise_optimizer(rack, args), args),
        "llama": make_step(
            llama, lambda ids: llama(input_ids=ids).logits, llama_optimizer(llama, args), args
        ),
    }
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(
        0, args.vocab_size, (shape.batch_size, args.seq_len + 1), generator=generator
    ).to(args.device)
    for step in steps.values():
        for _ in range(args.warmup):
            step(batch)
    share = shared_kernel_share(steps["llama"], batch)
    compile_seconds: dict[str, float] = {}
    if args.compiled:
        # Copies, so the eager models keep running eagerly; compiled on their first steps.
        compiled_rack = torch.compile(copy.deepcopy(rack))
        compiled_llama = torch.compile(copy.deepcopy(llama))
        steps["stackwise_compiled"] = make_step(
            compiled_rack, compiled_rack, stackwise_optimizer(compiled_rack, args), args
        )
        steps["llama_compiled"] = make_step(
            compiled_llama,
            lambda ids: compiled_llama(input_ids=ids).logits,
            llama_optimizer(compiled_llama, args),
            args,
        )
        for name in ("stackwise_compiled", "llama_compiled"):
            start = time.perf_counter()
            for _ in range(max(2, args.warmup)):
                steps[name](batch)
            _device.synchronize(args.device)
            compile_seconds[name] = time.perf_counter() - start

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
    compiled = {}
    if args.compiled:
        compiled = {
            "speed_ratio_vs_llama_compiled": steps_per_s["stackwise"]
            / steps_per_s["llama_compiled"],
            "speed_ratio_compiled_vs_llama_compiled": steps_per_s["stackwise_compiled"]
            / steps_per_s["llama_compiled"],
            "gain_from_compile": {
                "stackwise": steps_per_s["stackwise_compiled"] / steps_per_s["stackwise"],
                "llama": steps_per_s["llama_compiled"] / steps_per_s["llama"],
            },
            "compile_and_warmup_seconds": compile_seconds,
        }
    return {
        "shape": {**asdict(shape), "d_ff": d_ff, "seq_len": args.seq_len},
        "speed_ratio": steps_per_s["stackwise"] / steps_per_s["llama"],
        # Llama's eager step in matmuls and the SDPA kernel, which StackWise runs alike: the
        # ratio StackWise would reach if everything else it does took no time
        "llama_shared_kernel_share": share,
        "speed_ratio_ceiling": 1.0 / share if share else None,
        **compiled,
        # fastest round of each: less sensitive to other load on a shared machine
        "speed_ratio_best_round": best["llama"] / best["stackwise"],
        "steps_per_s": steps_per_s,
        "tokens_per_s": {name: s * tokens for name, s in steps_per_s.items()},
        "median_step_s": median,
        "step_s_per_round": per_step,
        "parameters": counts,
    }


def row(r: dict, args: argparse.Namespace, on: str) -> dict:
    """The README row of one shape."""
    figure = (
        f"**{r['speed_ratio']:.2f}x** Llama's steps/s ({r['median_step_s']['stackwise']:.3f} s"
        f" vs {r['median_step_s']['llama']:.3f} s per step; fastest rounds:"
        f" {r['speed_ratio_best_round']:.2f}x)"
    )
    if "speed_ratio_vs_llama_compiled" in r:
        gain = r["gain_from_compile"]
        figure += (
            f"; vs Llama compiled {r['speed_ratio_vs_llama_compiled']:.2f}x; both compiled "
            f"{r['speed_ratio_compiled_vs_llama_compiled']:.2f}x (compiling gains StackWise "
            f"{gain['stackwise']:.2f}x, Llama {gain['llama']:.2f}x)"
        )
    met = r["speed_ratio"] >= GOAL
    note = ""
    if not met:
        note = (
            f"{r['llama_shared_kernel_share']:.0%} of Llama's eager step is in matmuls and the "
            "SDPA kernel, which StackWise runs alike, so with every other operator free it "
            f"would reach at most {r['speed_ratio_ceiling']:.2f}x; where StackWise's step "
            "spends the rest: see the MFU row"
        )
    return headline(
        f"Training speed vs Hugging Face Llama (sdpa), causal GQA, d_model {r['shape']['d_model']}"
        f" x {r['shape']['layers']} layers, seq {args.seq_len}, batch {r['shape']['batch_size']}"
        f", forward + backward + clipping + fused AdamW, eager, interleaved rounds, median{on}",
        figure,
        f">= {GOAL}",
        met,
        note,
    )


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
    parser.add_argument(
        "--compiled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time both models under torch.compile (default: on, off with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="one tiny shape, 2 rounds (seconds)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    if args.compiled is None:
        args.compiled = not args.quick
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
    rows = [row(r, args, on) for r in results.values()]
    result = {
        "benchmark": "bench_vs_llama",
        "shapes": results,
        "speed_ratio": {label: r["speed_ratio"] for label, r in results.items()},
        "goal": f"speed_ratio >= {GOAL} at every shape",
        "goal_met": all(r["speed_ratio"] >= GOAL for r in results.values()),
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
