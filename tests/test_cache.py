"""Activation cache: exactness (cached == uncached), linear cost, storage locations."""

from __future__ import annotations

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


def test_disk_cache_gives_the_same_losses(tmp_path: Path) -> None:
    disk = {"enabled": True, "location": "disk", "directory": str(tmp_path)}
    disk_losses, _, results = train(config_for("mlm", disk))
    memory_losses, _, _ = train(config_for("mlm", {"enabled": True, "location": "cpu"}))
    assert disk_losses == memory_losses
    assert results.stages[1].extra["cache_on_disk"] == 1.0
    assert list(tmp_path.iterdir()) == []  # the memory-mapped file is deleted afterwards


def test_low_precision_cache_and_frozen_pieces_train() -> None:
    config = config_for("diffusion", {"dtype": "bf16"}, frozen_precision="bf16")
    losses, weights, _ = train(config)
    assert all(v == v for v in losses)  # finite
    assert all(w.dtype == torch.float32 for w in weights.values())  # restored to fp32


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
    cpu = torch.device("cpu")
    assert choose_location(1000, cpu, "auto", 1.0) == "cpu"
    assert choose_location(int(2e9), cpu, "auto", 1.0) == "disk"
    assert choose_location(1000, cpu, "device", 1.0) == "cpu"
    assert choose_location(1000, cpu, "disk", 1.0) == "disk"


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
