"""Activation cache: exactness (cached == uncached), linear cost, storage locations."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stackwise.config.base import StackWiseConfig
from stackwise.data import build_data
from stackwise.model.architecture import create_rack_from_config
from stackwise.training.architecture_trainer import ArchitectureTrainer
from stackwise.training.cache import ActivationCache, choose_location
from stackwise.training.callbacks import TrainingCallback


def config_for(objective: str, cache: dict[str, Any], **training: Any) -> StackWiseConfig:
    return StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": 32,
                "n_heads": 2,
                "architecture": {"n_stacks": 3, "blocks_per_stack": 1},
                "attention_mode": "causal" if objective == "clm" else "bidirectional",
                "dropout": 0.1,
            },
            "training": {
                "training_architecture": "blockwise",
                "objective": objective,
                "batch_size": 4,
                "seq_len": 16,
                "budget": {"steps": 9},
                "grad_accum_steps": 2,
                "log_every_steps": 1,
                "eval": {"batches": 2},
                "cache": cache,
                **training,
            },
            "data": {"max_tokens": 20_000},
        }
    )


class Losses(TrainingCallback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.values.extend(v for k, v in metrics.items() if k in ("train/loss", "val/loss"))


def train(config: StackWiseConfig) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    data = build_data(config.data, config.training)
    rack = create_rack_from_config(config)
    losses = Losses()
    results = ArchitectureTrainer(config, [losses]).train_architecture(
        rack, data.train_loader, data.val_loader
    )
    return losses.values, rack.state_dict(), results


@pytest.mark.parametrize("objective", ["clm", "mlm", "diffusion"])
def test_cached_and_uncached_training_are_identical(objective: str) -> None:
    cached_losses, cached_weights, cached = train(config_for(objective, {"enabled": True}))
    plain_losses, plain_weights, plain = train(config_for(objective, {"enabled": False}))
    assert len(cached_losses) == len(plain_losses) > 9
    assert cached_losses == plain_losses  # exact: same masks, same trunk outputs
    assert all(torch.equal(cached_weights[k], plain_weights[k]) for k in cached_weights)
    # The cache saves compute: the trunk runs once per pool sample, not once per step.
    assert cached.flops < plain.flops
    assert cached.stages[2].extra["cache_bytes"] > 0


@pytest.mark.parametrize("objective", ["clm", "mlm", "diffusion"])
def test_memory_mapped_in_memory_and_uncached_give_identical_losses(
    objective: str, tmp_path: Path
) -> None:
    """The memory-mapped file (read ahead on a thread, pages handed back after each copy),
    host memory and no cache at all train the same weights; validation reads the cache too."""
    disk = {"enabled": True, "location": "disk", "directory": str(tmp_path)}
    disk_losses, disk_weights, results = train(config_for(objective, disk))
    memory_losses, memory_weights, _ = train(config_for(objective, {"location": "cpu"}))
    plain_losses, plain_weights, _ = train(config_for(objective, {"enabled": False}))
    assert len(disk_losses) > 9
    assert disk_losses == memory_losses == plain_losses
    for key, value in plain_weights.items():
        assert torch.equal(disk_weights[key], value) and torch.equal(memory_weights[key], value)
    assert results.stages[1].extra["cache_on_disk"] == 1.0
    assert list(tmp_path.iterdir()) == []  # the memory-mapped file is deleted afterwards


def test_auto_spills_beyond_the_allowance_beside_the_checkpoints(tmp_path: Path) -> None:
    """With `auto`, a pool larger than what rackwise training would use beyond a stage goes
    to a file in the checkpoint folder while the run lasts, with the in-memory losses."""
    seen: list[list[str]] = []

    class Folders(Losses):
        def on_stage_start(self, stage: Any, step: int) -> None:
            seen.append(sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("stack")))

    # max_memory_gb below the pool (4 x 16 x 32 floats per micro-batch, 6 of them) forces it.
    config = config_for("clm", {"max_memory_gb": 1e-6})
    data = build_data(config.data, config.training)
    folders = Folders()
    results = ArchitectureTrainer(config, [folders], checkpoint_dir=tmp_path).train_architecture(
        create_rack_from_config(config), data.train_loader, data.val_loader
    )
    assert results.stages[1].extra["cache_on_disk"] == 1.0
    assert len(seen[1]) == 2 and all(n.startswith("stackwise-cache-") for n in seen[1])
    assert not any(p.name.startswith("stackwise-cache-") for p in tmp_path.iterdir())
    memory_losses, _, _ = train(config_for("clm", {"location": "cpu"}))
    assert folders.values == memory_losses


def test_low_precision_cache_and_frozen_pieces_train() -> None:
    """bf16 cache and frozen pieces follow the fp32 run within bf16 rounding, and every piece
    comes back in fp32 — a frozen one with exactly its fp32 weights."""
    # A high learning rate, so that the loss depends on the context the trunk provides.
    fast = {"optimizer": {"lr": 1e-2}, "budget": {"steps": 15}}
    bf16 = config_for("diffusion", {"dtype": "bf16"}, frozen_precision="bf16", **fast)
    low, low_weights, _ = train(bf16)
    full, full_weights, _ = train(config_for("diffusion", {"dtype": "fp32"}, **fast))
    assert len(low) == len(full) > 15
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per value); here the loss
    # moves by about 1e-3 relative; frozen weights damaged by the cast move it by more (halving
    # one frozen block's weights: 7e-3). Cache exactness itself is the cached == uncached test.
    for a, b in zip(low, full, strict=True):
        assert math.isfinite(a) and abs(a - b) <= 5e-3 * abs(b), (low, full)
    assert all(w.dtype == torch.float32 for w in low_weights.values())  # restored to fp32
    # Block 0 is frozen after stage 0 (identical in both runs): restored bitwise, not from bf16.
    block_0 = [k for k in full_weights if k.startswith(("blocks.0.", "stacks.0."))]
    assert block_0
    assert all(torch.equal(low_weights[k], full_weights[k]) for k in block_0)


def test_trunk_blocks_run_once_per_pool_sample_with_the_cache() -> None:
    """Cost is linear in depth: block 0 runs in its stage, then once to fill the cache."""
    calls: dict[bool, int] = {}
    for enabled in (True, False):
        config = config_for("mlm", {"enabled": enabled})
        data = build_data(config.data, config.training)
        rack = create_rack_from_config(config)
        count = [0]

        def hook(module: nn.Module, args: Any, output: Any, count: list[int] = count) -> None:
            count[0] += 1

        rack.blocks[0].register_forward_hook(hook)
        ArchitectureTrainer(config).train_architecture(rack, data.train_loader)
        calls[enabled] = count[0]
    pool = 3 * 2  # max stage steps x grad_accum micro-batches
    assert calls[True] == 3 * 2 + pool  # stage 0 training + one fill pass
    assert calls[False] == 3 * 2 * 3  # every step of every stage


def test_location_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_location(1000, cpu, "auto", 1.0) == "cpu"
    assert choose_location(int(2e9), cpu, "auto", 1.0) == "disk"
    assert choose_location(1000, cpu, "auto", 1.0, allowance_bytes=999) == "disk"
    assert choose_location(1000, cpu, "auto", 1.0, allowance_bytes=1000) == "cpu"
    assert choose_location(1000, cpu, "device", 1.0) == "cpu"
    assert choose_location(1000, cpu, "disk", 1.0) == "disk"
    # On an accelerator the cache is never on the device unless asked for.
    assert choose_location(1000, cuda, "auto", 1.0) == "cpu"
    assert choose_location(1000, cuda, "device", 1.0) == "device"


def test_read_ahead_never_returns_rows_written_after_it(tmp_path: Path) -> None:
    cache = ActivationCache(
        [2] * 4, 3, 5, device=torch.device("cpu"), location="disk", directory=str(tmp_path)
    )
    rows = [torch.full((2, 3, 5), float(i)) for i in range(4)]
    cache.fill(lambda i: rows[i], prefix_end=1)
    assert torch.equal(cache.read(0), rows[0])  # reads 1 ahead
    cache.write(1, rows[1] + 10)
    assert torch.equal(cache.read(1), rows[1] + 10)
    assert torch.equal(cache.read(3), rows[3])  # out of order: the read-ahead of 2 is dropped
    assert torch.equal(cache.read(2), rows[2])
    cache.close()


def _resident_bytes() -> int:
    """Anonymous and file-backed resident memory of this process (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields["RssAnon"] + fields["RssFile"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_disk_cache_keeps_about_two_micro_batches_resident(tmp_path: Path) -> None:
    batch = (16, 128, 64)  # 0.5 MB a micro-batch
    n = 160  # 84 MB in all
    grown = {}
    for location in ("disk", "cpu"):
        before = _resident_bytes()
        cache = ActivationCache(
            [batch[0]] * n,
            *batch[1:],
            device=torch.device("cpu"),
            location=location,
            directory=str(tmp_path),
        )
        cache.fill(lambda i: torch.full(batch, float(i)), prefix_end=1)
        cache.extend(lambda h, i: h + 1, prefix_end=2)
        assert all(float(cache.read(i)[3, 4, 5]) == i + 1 for i in range(n))
        grown[location] = _resident_bytes() - before
        cache.close()
    assert grown["cpu"] > 0.9 * cache.size_bytes  # what a file saves
    assert grown["disk"] < 0.25 * cache.size_bytes


def test_cache_storage_round_trip(tmp_path: Path) -> None:
    for location in ("cpu", "disk"):
        cache = ActivationCache(
            [2, 3], 4, 8, device=torch.device("cpu"), location=location, directory=str(tmp_path)
        )
        first, second = torch.randn(2, 4, 8), torch.randn(3, 4, 8)
        cache.fill(lambda i, a=(first, second): a[i], prefix_end=1)
        assert torch.equal(cache.read(0), first) and torch.equal(cache.read(1), second)
        cache.extend(lambda h, i: h * 2, prefix_end=2)
        assert torch.equal(cache.read(1), second * 2) and cache.prefix_end == 2
        cache.close()
