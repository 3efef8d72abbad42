"""FAVOR+ accuracy: relative error of kernel attention's output against exact softmax attention,
for each way of drawing the random features, against the number of features.

A probe: one head (no RoPE) whose queries, keys and values are ``s·x``, ``s·P x`` and ``P' x``
for Gaussian inputs x and random rotations P, P' (T = 128 tokens, batch 4), with ``s`` set so
that the scores ``qᵀk / sqrt(head_dim)`` have the wanted standard deviation. The error is
``|out - exact| / |exact|`` over the whole output, averaged over projection seeds; exact softmax
attention is computed in fp64 from the same q, k, v. ``features_for_goal`` is the smallest
feature count tried whose error is at most the goal.

Run: ``python benchmarks/bench_favor.py [--seeds 8]``
``--quick``: fewer counts and seeds (seconds; for tests).
Goal: error <= 0.15 at score std 0.33, head_dim 16, the default feature count (44).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from _report import headline, publish

from stackwise.model.attention import FAVOR_SAMPLINGS, KernelAttention, default_n_features

GOAL = 0.15


def probe(
    head_dim: int, scale: float, n_features: int, seed: int, mode: str, sampling: str
) -> KernelAttention:
    gen = torch.Generator().manual_seed(1000 + seed)
    attn = KernelAttention(
        head_dim, 1, attention_mode=mode, use_rope=False, feature_map="favor",  # type: ignore[arg-type]
        n_features=n_features, seed=seed, sampling=sampling,  # type: ignore[arg-type]
    )  # fmt: skip
    rotations = [torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen))[0] for _ in "kv"]
    eye = torch.eye(head_dim)
    with torch.no_grad():
        attn.qkv_proj.weight.copy_(torch.cat((scale * eye, scale * rotations[0], rotations[1])))
        attn.o_proj.weight.copy_(eye)
    return attn


def exact_attention(attn: KernelAttention, x: torch.Tensor) -> torch.Tensor:
    q, k, v = (x @ w.T for w in attn.qkv_proj.weight.double().chunk(3))
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    if attn.causal:
        future = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def error(
    head_dim: int, score_std: float, n_features: int, mode: str, sampling: str, seeds: int
) -> float:
    x = torch.randn(4, 128, head_dim, generator=torch.Generator().manual_seed(0))
    scale = math.sqrt(score_std)  # q = s·x, k = s·Px: score std = s² for unit Gaussian x
    total = 0.0
    for seed in range(seeds):
        attn = probe(head_dim, scale, n_features, seed, mode, sampling)
        exact = exact_attention(attn, x.double())
        with torch.no_grad():
            got = attn(x).double()
        total += ((got - exact).norm() / exact.norm()).item() / seeds
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="fewer counts and seeds (seconds)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cases: list[tuple[int, float, list[int]]] = [
        (16, 0.33, [16, 44, 64, 128, 256, 704, 2816]),
        (16, 1.0, [44, 256, 2816]),
        (64, 0.33, [64, 266, 1024, 4096]),
    ]
    if args.quick:
        args.seeds = 1
        cases = [(16, 0.33, [16, 44]), (64, 0.33, [266])]
    rows: list[dict[str, Any]] = []
    for head_dim, score_std, counts in cases:
        for mode in ("bidirectional", "causal"):
            for sampling in FAVOR_SAMPLINGS:
                errors = {
                    m: error(head_dim, score_std, m, mode, sampling, args.seeds) for m in counts
                }
                reached = [m for m, e in errors.items() if e <= GOAL]
                rows.append(
                    {
                        "head_dim": head_dim,
                        "score_std": score_std,
                        "mode": mode,
                        "sampling": sampling,
                        "errors": {str(m): round(e, 4) for m, e in errors.items()},
                        "features_for_goal": min(reached) if reached else None,
                    }
                )

    def at_default(sampling: str, mode: str, head_dim: int = 16) -> float:
        row = next(
            r
            for r in rows
            if (r["head_dim"], r["score_std"], r["mode"], r["sampling"])
            == (head_dim, 0.33, mode, sampling)
        )
        return row["errors"][str(default_n_features(head_dim))]

    def needed(sampling: str) -> str:
        counts = [
            r["features_for_goal"]
            for r in rows
            if (r["head_dim"], r["score_std"], r["sampling"]) == (16, 0.33, sampling)
        ]
        return " / ".join("more than tried" if c is None else str(c) for c in counts)

    default = {mode: at_default("regularized", mode) for mode in ("bidirectional", "causal")}
    performer = {mode: at_default("orthogonal", mode) for mode in ("bidirectional", "causal")}
    met = max(default.values()) <= GOAL
    report = {
        "benchmark": "bench_favor",
        "settings": {"seeds": args.seeds, "seq_len": 128, "batch_size": 4},
        "results": rows,
        "headline": [
            headline(
                "FAVOR+ relative error vs exact softmax attention, score std 0.33, head_dim 16, "
                "default 44 features, bidirectional / causal: default draw (regularized) vs the "
                "Performer's orthogonal draw",
                f"{default['bidirectional']:.3f} / {default['causal']:.3f} "
                f"(orthogonal {performer['bidirectional']:.3f} / {performer['causal']:.3f})",
                f"<= {GOAL}",
                met,
                ""
                if met
                else "random features are too few: the error falls about as 1/sqrt(features); "
                f"features needed for {GOAL} (bidirectional / causal): regularized "
                f"{needed('regularized')}, antithetic {needed('antithetic')}, orthogonal "
                f"{needed('orthogonal')}",
            )
        ],
    }
    publish("bench_favor", report, args.out, quick=args.quick)


if __name__ == "__main__":
    main()
