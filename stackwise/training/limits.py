"""Limits checked before anything runs: does a run fit the device it would train on?

1. Count the rack's parameters from the config alone (`parameter_count`): exact, pure
   arithmetic, so a ``d_model: 1000000000`` is measured without building anything.
2. Screen it with a generous upper bound of its peak memory (`memory_upper_bound`, arithmetic
   only): a run whose bound fits its device's memory for certain is not estimated further, so
   validating ordinary files never imports torch. Otherwise estimate the run's peak memory with
   `stackwise.training.plan.estimate_run` (which falls back to "at least the weights" for a rack
   too large to plan stage by stage).
3. Compare it with the device's memory (`device_memory`): the RAM available now for CPU (and
   MPS, which shares it), the device's total memory for CUDA.
4. A run that cannot fit becomes a `MemoryProblem`: the setting most responsible for the size
   (`blamed_field`) and a one-line message with the estimate; `stackwise validate`, `plan` and
   `run` report it as a user error unless ``--no-memory-check`` is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stackwise.config.base import BYTE_VOCAB_SIZE, StackWiseConfig

if TYPE_CHECKING:
    import torch

    from stackwise.training.plan import RunEstimate


def _default_d_ff(d_model: int) -> int:
    # Same rule as `stackwise.model.architecture.default_d_ff` (kept free of torch here).
    multiple = 256 if d_model >= 1024 else 8
    return multiple * math.ceil(8 * d_model / 3 / multiple)


def _default_rope_head_dim(head_dim: int) -> int:
    return max(2, (head_dim // 2) // 2 * 2)


def vocab_size_of(config: StackWiseConfig, vocab_size: int | None = None) -> int:
    """The vocabulary a run's rack is built with (config, else tokenizer, else the given one)."""
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    if vocab_size is not None:
        return vocab_size
    return config.data.bpe_vocab_size if config.data.tokenizer == "bpe" else BYTE_VOCAB_SIZE


def parameter_count(config: StackWiseConfig, vocab_size: int | None = None) -> int:
    """Parameters of the rack `config` builds, counted without building it.

    Per block: two RMSNorms, the attention projections (grouped Q/K/V + output; for mla the
    compressed query, the shared K/V latent with its norm and up projection) and the SwiGLU's
    three matrices; then the embedding, the final norm and an untied LM head.
    """
    model = config.model
    d = model.d_model
    vocab = vocab_size_of(config, vocab_size)
    total = vocab * d + d + (0 if model.tie_embeddings else vocab * d)
    for stack in model.resolved_stacks():
        n_heads = stack.n_heads or model.n_heads
        head_dim = d // n_heads
        attention = stack.attention_type or model.attention_type
        d_ff = stack.d_ff or model.d_ff or _default_d_ff(d)
        block = 2 * d + 3 * d * d_ff
        if attention == "mla":
            rope = model.mla.rope_head_dim or _default_rope_head_dim(head_dim)
            kv_rank = model.mla.kv_lora_rank or max(1, d // 4)
            q_width = n_heads * (head_dim + rope)
            q_rank = model.mla.q_lora_rank
            block += d * q_width if q_rank is None else d * q_rank + q_rank + q_rank * q_width
            block += d * (kv_rank + rope) + kv_rank + kv_rank * n_heads * 2 * head_dim
            block += n_heads * head_dim * d
        else:
            n_kv_heads = stack.n_kv_heads or model.n_kv_heads or n_heads
            block += d * (n_heads + 2 * n_kv_heads) * head_dim + n_heads * head_dim * d
        total += stack.n_blocks * block
    return total


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
    for stack in model.resolved_stacks():
        heads = stack.n_heads or model.n_heads
        d_ff = stack.d_ff or model.d_ff or _default_d_ff(d)
        per_block = (
            micro * (32 * d + 8 * d_ff) + training.batch_size * heads * training.seq_len**2 * 3
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
    """The setting that most makes a run big: the model's width or depth when the weights
    dominate the estimate, else the batch's size or length."""
    model, training = config.model, config.training
    weights = 4 * estimate.total_parameters
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
    `memory_upper_bound` are not estimated (no torch import)."""
    import psutil

    floor = int(psutil.virtual_memory().available)
    if config.training.device != "cpu":
        floor = min(floor, ANY_DEVICE_BYTES)
    if memory_upper_bound(config) <= floor:
        return None

    from stackwise.training.device import resolve_device
    from stackwise.training.plan import estimate_run

    try:
        device = resolve_device(config.training.device)
    except (RuntimeError, ValueError):
        return None
    estimate = estimate_run(config)
    available, where = device_memory(device)
    return memory_problem(config, estimate, available, where)
