"""Generation speed with and without the KV cache, per causal attention type (CPU by default).

For each attention type a small causal rack (default d_model 256, 4 blocks, vocabulary 260) is
built with a fixed seed and continues a random prompt greedily by ``--new-tokens`` tokens, once
through `Rack.generate` with the cache (prefill, then one position per step) and once
recomputing the whole sequence every step. Both must produce the same tokens (checked). Each
is timed ``--repeats`` times; the best round counts (least disturbed by other work on the
machine), with both wall time and the calling thread's CPU time (``--threads 1`` default, so
that thread does all the work):

    tokens_per_s = new tokens / seconds          speedup = cached tokens/s / recompute tokens/s

    python benchmarks/bench_generate.py [--d-model 256 --layers 4 --prompt 32 --new-tokens 256]
"""

from __future__ import annotations

import argparse
import time

import torch
from _report import publish

from stackwise.model import create_simple_rack

ATTENTIONS = {
    "mha": {},
    "gqa": {"n_kv_heads": 2},
    "mla": {},
    "kernel": {"kernel_feature_map": "elu"},
    "kernel_favor": {"kernel_feature_map": "favor"},
}


def measure(rack: torch.nn.Module, prompt: torch.Tensor, new: int, cache: bool, repeats: int):
    best_wall, best_cpu, tokens = float("inf"), float("inf"), None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.thread_time()
        out = rack.generate(prompt, max_new_tokens=new, temperature=0.0, use_cache=cache)
        best_cpu = min(best_cpu, time.thread_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
        tokens = out.tokens
    return best_wall, best_cpu, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=list(ATTENTIONS), choices=list(ATTENTIONS))
    parser.add_argument("--quick", action="store_true", help="d_model 32, 16 tokens (seconds)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.layers, args.new_tokens, args.prompt, args.repeats = 32, 2, 16, 8, 1
    torch.set_num_threads(args.threads)
    prompt = torch.randint(0, 256, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    rows = []
    for name in args.only:
        options = dict(ATTENTIONS[name])
        kind = "kernel" if name.startswith("kernel") else name
        rack = create_simple_rack(
            n_stacks=1,
            blocks_per_stack=args.layers,
            d_model=args.d_model,
            n_heads=args.n_heads,
            attention_type=kind,
            attention_mode="causal",
            seed=0,
            **options,
        ).eval()
        rack.generate(prompt, max_new_tokens=4, temperature=0.0)  # warm-up
        cached = measure(rack, prompt, args.new_tokens, True, args.repeats)
        recomputed = measure(rack, prompt, args.new_tokens, False, args.repeats)
        if not torch.equal(cached[2], recomputed[2]):
            raise SystemExit(f"{name}: cached and recomputed generations differ")
        row = {"attention": name}
        for label, (wall, cpu, _) in (("cached", cached), ("recompute", recomputed)):
            row[f"{label}_tokens_per_s"] = round(args.new_tokens / wall, 1)
            row[f"{label}_tokens_per_cpu_s"] = round(args.new_tokens / cpu, 1)
        row["speedup_cpu_time"] = round(
            row["cached_tokens_per_cpu_s"] / row["recompute_tokens_per_cpu_s"], 2
        )
        rows.append(row)
        print(row, flush=True)
    publish(
        "bench_generate",
        {
            "shape": {
                "d_model": args.d_model,
                "layers": args.layers,
                "n_heads": args.n_heads,
                "prompt": args.prompt,
                "new_tokens": args.new_tokens,
            },
            "rows": rows,
        },
        args.out,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
