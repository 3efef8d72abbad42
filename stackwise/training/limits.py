"""Whether a run fits its device, checked before anything runs.

A run is screened with a generous upper bound of its peak memory
(`memory_upper_bound`, arithmetic only); one whose bound fits its device for certain is not
estimated further. Otherwise its estimated peak is compared with the device's memory
(`device_memory`: the RAM available now for CPU and MPS, the total memory for CUDA); a run
that cannot fit becomes a `MemoryProblem` naming the setting most responsible for the size
(`blamed_field`). `stackwise validate`, `plan` and `run` report it as a user error unless
``--no-memory-check`` is given.

Reading this module does not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stackwise.config.base import StackWiseConfig
from stackwise.training.memory import (
    RunEstimate,
    estimate_run,
    memory_floor,
    parameter_count,
    vocab_size_of,
)

if TYPE_CHECKING:
    import torch


# Memory every accelerator a run may resolve to (`auto`, `cuda`, `mps`) is taken to have without
# asking torch; a run whose upper bound is below it (and below the free RAM) fits anywhere.
ANY_DEVICE_BYTES = 2 * 2**30


def memory_upper_bound(config: StackWiseConfig) -> int:
    """A generous upper bound of a run's peak training memory in bytes, from the config alone.

    Every parameter trainable at once with AdamW (16 bytes; an untied depth-wise head counted
    again), fp32 activations of every block for one micro-batch (attention probabilities
    included), logits with their gradients, and an activation cache of the whole token budget;
    doubled.
    """
    model, training = config.model, config.training
    budget = training.budget
    per_step = training.batch_size * training.grad_accum_steps * training.seq_len
    if budget.steps is not None:
        tokens = budget.steps * per_step
    elif budget.tokens is not None:
        tokens = budget.tokens + per_step
    else:
        # Every trained token costs at least the forward and input gradient of the LM head
        # (2 x 2 x d_model x vocab FLOPs), which bounds the tokens a FLOPs budget can buy.
        readout = 4 * model.d_model * vocab_size_of(config)
        tokens = math.ceil((budget.flops or 0.0) / readout) + per_step
    d = model.d_model
    vocab = vocab_size_of(config)
    weights = 16 * (parameter_count(config) + vocab * d)
    micro = training.batch_size * training.seq_len
    activations = 0
    for stack, spec in zip(model.resolved_stacks(), model.block_specs(), strict=True):
        per_block = (
            micro * (32 * d + 8 * spec.d_ff)
            + training.batch_size * spec.n_heads * training.seq_len**2 * 3
        )
        activations += stack.n_blocks * 4 * per_block
    logits = 4 * 4 * micro * vocab
    cache = (tokens + training.eval.batches * micro) * (4 * d + 8)
    return 2 * (weights + activations + logits + cache)


def device_memory(device: torch.device) -> tuple[int, str]:
    """Bytes a run on `device` can use, and how to name that memory in a message."""
    import psutil

    if device.type == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        return int(properties.total_memory), f"{properties.name} ({device.type}:{index})"
    available = int(psutil.virtual_memory().available)
    return available, f"the RAM available on this machine ({device.type})"


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; up to EiB, then in scientific notation."""
    value = float(n)
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(value) < 1024 or suffix == "EiB":
            if suffix == "B":
                return f"{value:.0f} B"
            return f"{value:.1f} {suffix}" if abs(value) < 1024 else f"{value:.2e} {suffix}"
        value /= 1024
    return f"{n:.3g} B"


def blamed_field(config: StackWiseConfig, estimate: RunEstimate) -> str:
    """The setting that most makes a run big: the model's width or depth when its parameters
    (with their gradients and optimizer state) are at least half the estimate, else the batch's
    size or length."""
    model, training = config.model, config.training
    # What the parameters hold: every weight in fp32, and gradients and AdamW state (12 bytes a
    # parameter) of the largest stage's trained ones.
    trained = max((stage.trainable_parameters for stage in estimate.stages), default=0)
    weights = 4 * estimate.total_parameters + 12 * trained
    if weights * 2 >= estimate.peak_memory_bytes:
        vocab = vocab_size_of(config)
        stacks = model.resolved_stacks()
        depth = sum(s.n_blocks for s in stacks)
        if vocab * model.d_model * 2 > estimate.total_parameters:
            return "model.vocab_size" if model.vocab_size is not None else "data.bpe_vocab_size"
        if depth / 8 > (model.d_model / 512) ** 2:
            if model.stacks is not None:
                return "model.stacks"
            architecture = model.architecture
            if architecture.n_stacks >= architecture.blocks_per_stack:
                return "model.architecture.n_stacks"
            return "model.architecture.blocks_per_stack"
        return "model.d_model"
    if training.batch_size / 16 >= training.seq_len / 128:
        return "training.batch_size"
    return "training.seq_len"


@dataclass(frozen=True)
class MemoryProblem:
    """A run that cannot fit its device: the setting to change and what to tell the user."""

    field: str
    message: str


def memory_problem(
    config: StackWiseConfig, estimate: RunEstimate, available: int, where: str
) -> MemoryProblem | None:
    """Why a run with this estimate cannot fit `available` bytes (None when it fits)."""
    peak = estimate.peak_memory_bytes
    if peak <= available:
        return None
    amount = "at least" if estimate.note else "an estimated"
    return MemoryProblem(
        field=blamed_field(config, estimate),
        message=f"needs {amount} {format_bytes(peak)} of memory at its peak "
        f"({estimate.total_parameters:.3g} parameters), more than the "
        f"{format_bytes(available)} of {where}; make it smaller, or pass --no-memory-check "
        f"to try anyway",
    )


def check_run_memory(config: StackWiseConfig) -> MemoryProblem | None:
    """Estimate one run and compare it with its device (None when it fits or the device is not
    available here, which the device check reports). Runs that fit for certain by
    `memory_upper_bound`, and runs on the CPU that cannot fit by `memory_floor`, are decided
    from their shapes (no torch import); the estimate in between never allocates in proportion
    to the run's size (`EXACT_ACTIVATION_TOKENS`)."""
    import psutil

    ram = int(psutil.virtual_memory().available)
    cpu = config.training.device == "cpu"
    floor = ram if cpu else min(ram, ANY_DEVICE_BYTES)
    if memory_upper_bound(config) <= floor:
        return None
    if cpu:
        available, where = ram, "the RAM available on this machine (cpu)"
    else:
        from stackwise.training.device import resolve_device

        try:
            device = resolve_device(config.training.device)
        except (RuntimeError, ValueError):
            return None
        available, where = device_memory(device)
    lower = memory_floor(config)
    if lower > available:
        # Too large for certain: said from the shapes, without building or estimating anything.
        estimate = RunEstimate(
            total_parameters=parameter_count(config),
            peak_memory_bytes=lower,
            note="a lower bound: the weights and one batch",
        )
    else:
        estimate = estimate_run(config)
    return memory_problem(config, estimate, available, where)
