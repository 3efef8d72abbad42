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

Printed as JSON and written to ``benchmarks/results/bench_vs_llama.json``.

    python benchmarks/bench_vs_llama.py [--d-model 256 --layers 4 --seq-len 256 ...]

Needs the `bench` extra (``pip install -e .[bench]``, i.e. transformers).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _report import publish
from torch import nn

from stackwise.model import create_simple_rack


def build_llama(args: argparse.Namespace, d_ff: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.d_model,
        intermediate_size=d_ff,
        num_hidden_layers=args.layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
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
    model: nn.Module, logits_of: Callable[[torch.Tensor], torch.Tensor], vocab_size: int
) -> Callable[[torch.Tensor], float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(ids: torch.Tensor) -> float:
        logits = logits_of(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def unique_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--n-kv-heads", type=int, default=2)
    parser.add_argument("--d-ff", type=int, default=None, help="default: StackWise's rule")
    parser.add_argument("--vocab-size", type=int, default=260)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--clock",
        choices=("wall", "thread_cpu"),
        default="wall",
        help="`thread_cpu`: CPU time of the (single) compute thread, robust to other load on "
        "the machine; implies --threads 1",
    )
    parser.add_argument("--out", default="benchmarks/results/bench_vs_llama.json")
    args = parser.parse_args()
    if args.clock == "thread_cpu":
        args.threads = 1  # CPU backward runs on the calling thread, so one thread sees it all
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time

    rack = create_simple_rack(
        n_stacks=1,
        blocks_per_stack=args.layers,
        d_model=args.d_model,
        d_ff=args.d_ff,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        attention_type="gqa",
        attention_mode="causal",
        vocab_size=args.vocab_size,
        tie_embeddings=True,
        seed=0,
    )
    d_ff = rack.blocks[0].spec()["d_ff"]
    torch.manual_seed(0)
    llama = build_llama(args, d_ff)
    counts = {"stackwise": unique_parameter_count(rack), "llama": unique_parameter_count(llama)}
    if counts["stackwise"] != counts["llama"]:
        raise SystemExit(f"parameter counts differ: {counts}")

    steps = {
        "stackwise": make_step(rack, rack, args.vocab_size),
        "llama": make_step(llama, lambda ids: llama(input_ids=ids).logits, args.vocab_size),
    }
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(
        0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator
    )
    for step in steps.values():
        for _ in range(args.warmup):
            step(batch)

    per_step: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.rounds):
        # Alternate which model goes first so drift in machine speed hits both alike.
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            start = clock()
            for _ in range(args.steps):
                steps[name](batch)
            per_step[name].append((clock() - start) / args.steps)

    median = {name: statistics.median(times) for name, times in per_step.items()}
    best = {name: min(times) for name, times in per_step.items()}
    steps_per_s = {name: 1.0 / t for name, t in median.items()}
    tokens = args.batch_size * args.seq_len
    import transformers

    result = {
        "benchmark": "bench_vs_llama",
        "speed_ratio": steps_per_s["stackwise"] / steps_per_s["llama"],
        # fastest round of each: less sensitive to other load on a shared machine
        "speed_ratio_best_round": best["llama"] / best["stackwise"],
        "steps_per_s": steps_per_s,
        "tokens_per_s": {name: s * tokens for name, s in steps_per_s.items()},
        "median_step_s": median,
        "step_s_per_round": per_step,
        "parameters": counts,
        "config": {**vars(args), "d_ff": d_ff, "threads": torch.get_num_threads()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "machine": platform.machine(),
    }
    publish("bench_vs_llama", result, args.out)


if __name__ == "__main__":
    main()
