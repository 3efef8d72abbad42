"""What spilling the activation cache to disk costs in time: a memory-mapped file versus host
memory, for the same cache.

1. Read throughput: the cache of a pool (64 micro-batches of 16 x 128 x d_model 256 fp32, 134 MB)
   read in order as a stage reads it, from host memory and from the memory-mapped file with its
   read-ahead thread — *warm* (the file's pages still in the kernel's page cache, as right after
   the cache is built or extended) and *cold* (evicted with ``posix_fadvise(DONTNEED)`` after a
   sync, as when memory is short, which is when a cache spills).
2. A blockwise run's cached stages (every stage after the first reads the trunk output from the
   cache): wall time per optimizer step with ``cache.location: cpu`` versus ``disk``.

Rounds alternate between the two places; medians are reported, and the ratios disk / memory.

Run: ``python benchmarks/bench_cache_spill.py [--rounds 3] [--device cpu]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from _report import publish

import stackwise
from stackwise.config.base import StackWiseConfig
from stackwise.training.cache import ActivationCache


def read_seconds(location: str, cold: bool, device: torch.device, directory: str) -> float:
    """Seconds to read every micro-batch of a filled cache in order (and use it: a sum)."""
    rows, seq_len, d_model, batches = 16, 128, 256, 64
    cache = ActivationCache(
        [rows] * batches, seq_len, d_model, device=device, location=location, directory=directory
    )
    cache.fill(lambda i: torch.full((rows, seq_len, d_model), float(i)), prefix_end=1)
    mapped = cache._file
    if cold and mapped is not None and hasattr(os, "posix_fadvise"):
        # Write the file out, then evict its pages from the page cache (Linux).
        mapped.map.flush()
        os.posix_fadvise(mapped._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    total = torch.zeros((), device=device)
    for index in range(len(cache)):
        total += cache.read(index).sum()
    float(total)
    seconds = time.perf_counter() - start
    cache.close()
    return seconds


def stage_step_seconds(location: str, device: str) -> float:
    """Wall seconds per optimizer step of the stages that read the cache (blockwise, 4 blocks)."""
    steps_per_stage = 40
    config = StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": 128,
                "n_heads": 4,
                "vocab_size": 260,
                "attention_mode": "causal",
                "architecture": {"n_stacks": 1, "blocks_per_stack": 4},
            },
            "training": {
                "training_architecture": "blockwise",
                "objective": "clm",
                "batch_size": 16,
                "seq_len": 128,
                "budget": {"steps": 4 * steps_per_stage},
                "log_every_steps": 1000,
                "cache": {"location": location},
                "device": device,
            },
        }
    )
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, 256, (16, 128), generator=generator) for _ in range(steps_per_stage)
    ]
    results = stackwise.train(config, batches=batches).results
    cached = results.stages[1:]
    assert all(s.extra.get("cache_on_disk") == float(location == "disk") for s in cached)
    return sum(s.wall_time_s for s in cached) / sum(s.steps for s in cached)


def median_pair(measure: Any, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"cpu": [], "disk": []}
    for _ in range(rounds):
        for location in ("cpu", "disk"):
            times[location].append(measure(location))
    return {location: statistics.median(values) for location, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = 64 * 16 * 128 * 256 * 4
    with tempfile.TemporaryDirectory() as directory:
        warm = median_pair(lambda loc: read_seconds(loc, False, device, directory), args.rounds)
        cold = median_pair(lambda loc: read_seconds(loc, True, device, directory), args.rounds)
    step = median_pair(lambda loc: stage_step_seconds(loc, args.device), args.rounds)
    report = {
        "benchmark": "bench_cache_spill",
        "device": str(device),
        "torch": torch.__version__,
        "read": {
            "cache_bytes": size,
            "memory_gb_per_s": size / warm["cpu"] / 1e9,
            "disk_warm_gb_per_s": size / warm["disk"] / 1e9,
            "disk_cold_gb_per_s": size / cold["disk"] / 1e9,
            "disk_warm_over_memory_time": warm["disk"] / warm["cpu"],
            "disk_cold_over_memory_time": cold["disk"] / cold["cpu"],
        },
        "blockwise_stage": {
            "rack": {"n_blocks": 4, "d_model": 128, "seq_len": 128, "batch_size": 16},
            "memory_s_per_step": step["cpu"],
            "disk_s_per_step": step["disk"],
            "disk_over_memory_time": step["disk"] / step["cpu"],
        },
        "rounds": args.rounds,
    }
    publish("bench_cache_spill", report)


if __name__ == "__main__":
    main()
