"""The memory plan of a run: training memory per stage, and where the activation cache may live.

1. *Training memory* of a stage (`stage_training_memory`) is what `stackwise.training.metrics`
   measures while it runs — weights, gradients, optimizer state and the activations saved for
   backward by one micro-batch — counted here without allocating anything: the weights from
   the parameters' shapes, AdamW's state as two moments and a step count per trainable tensor,
   the activations by running the stage's forward and loss on fake tensors.
2. The *sample pool* of a depth-wise run is cached as ``rows x seq_len x d_model`` values of
   ``cache.dtype`` (`pool_cache_bytes`), plus its token ids in memory (`pool_token_bytes`).
3. The *cache allowance* (`cache_memory_allowance`) is the memory depth-wise training may give
   the cache without using more than end-to-end training of the same rack would: the rackwise
   stage's training memory, less the largest depth-wise stage's, less the pool's token ids.
   With ``cache.location: auto`` a cache larger than that spills to a memory-mapped file.
4. A spilled pool is bounded by ``cache.max_disk_gb`` (`stackwise.training.disk_budget`).

Racks are planned as skeletons (`skeleton`): built on the meta device, so the estimate of a
rack costs no memory and never touches a rack being trained.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from stackwise.config.base import StackWiseConfig
from stackwise.training.disk_budget import ELEMENT_BYTES, caches_pool
from stackwise.training.metrics import (
    TrainingMemory,
    estimate_activation_bytes,
    fake_tensor_mode,
)
from stackwise.training.plan import (
    StagePlan,
    eligible_parameters,
    plan_stages,
    pool_micro_batches,
    prepare_rack,
    trainable_parameters,
)

if TYPE_CHECKING:
    from stackwise.model.architecture import Rack

# AdamW's state per trainable tensor: exp_avg and exp_avg_sq (the tensor's size each) and a
# one-element float32 step count.
_ADAM_STEP_BYTES = 4


def autocast_dtype(config: StackWiseConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the trainer uses (CUDA with bf16/fp16 precision), else None."""
    precision = config.training.precision
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def skeleton(
    config: StackWiseConfig, rack: nn.Module | None = None, vocab_size: int | None = None
) -> Rack:
    """A meta-device rack shaped like `rack` (from its spec), else like the config's rack
    prepared for its mode, with the vocabulary of `vocab_size_of` (the config's, else
    `vocab_size`, else the tokenizer's)."""
    from stackwise.model.architecture import Rack, create_rack_from_config
    from stackwise.training.limits import vocab_size_of

    if isinstance(rack, Rack):
        with torch.device("meta"):
            return Rack.from_spec(rack.spec())
    data = config.to_dict()
    data["model"]["vocab_size"] = vocab_size_of(config, vocab_size)
    with torch.device("meta"):
        built = create_rack_from_config(data)
    prepare_rack(config, built)
    return built


def _rackwise_plan(rack: nn.Module) -> StagePlan:
    n_blocks = len(list(getattr(rack, "blocks")))  # noqa: B009
    return StagePlan(0, "rack", "rack", 0, n_blocks, 1, 0.0, True, 0, False, 1)


def _trained(rack: nn.Module, plan: StagePlan, eligible: set[int]) -> list[nn.Parameter]:
    if plan.depthwise:
        return trainable_parameters(rack, plan.start, plan.end, plan.trains_embedding, eligible)
    unique = {id(p): p for p in rack.parameters()}
    return [p for p in unique.values() if id(p) in eligible]


def _weights_bytes(
    config: StackWiseConfig, rack: nn.Module, plan: StagePlan, device: torch.device
) -> int:
    """Parameters and buffers on the training device: a depth-wise stage holds its frozen
    trunk in ``frozen_precision``, and off an accelerator with ``offload_frozen``."""
    training = config.training
    trunk: set[int] = set()
    if plan.depthwise:
        for block in list(getattr(rack, "blocks"))[: plan.start]:  # noqa: B009
            trunk.update(id(t) for t in [*block.parameters(), *block.buffers()])
    offloaded = plan.depthwise and training.offload_frozen and device.type != "cpu"
    frozen_bytes = ELEMENT_BYTES[training.frozen_precision]
    seen: set[int] = set()
    total = 0
    for tensor in [*rack.parameters(), *rack.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if id(tensor) in trunk:
            if offloaded:
                continue
            if tensor.is_floating_point():
                total += tensor.numel() * frozen_bytes
                continue
        total += tensor.numel() * tensor.element_size()
    return total


def stage_training_memory(
    config: StackWiseConfig,
    rack: nn.Module,
    plans: Sequence[StagePlan],
    device: torch.device | None = None,
) -> list[TrainingMemory]:
    """Training memory of each of `plans` on the skeleton `rack` (see the module docstring)."""
    from stackwise.training.objectives import build_objective

    training = config.training
    device = device if device is not None else torch.device("cpu")
    vocab = int(rack.vocab_size)  # type: ignore[arg-type]
    # What a stage saves for backward depends on the objective, not on its settings.
    objective = build_objective(training.objective, vocab_size=vocab, mask_token_id=vocab - 1)
    ids = torch.zeros(training.batch_size, training.seq_len, dtype=torch.long)
    batch = objective.corrupt(ids, torch.Generator().manual_seed(0))
    eligible = eligible_parameters(rack)
    mode = fake_tensor_mode()
    rack.train()
    memories = []
    for plan in plans:
        params = _trained(rack, plan, eligible)
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        activations = estimate_activation_bytes(
            rack,
            plan.start,
            plan.end,
            from_embedding=not plan.depthwise or plan.trains_embedding,
            trainable={id(p) for p in params},
            inputs=batch.inputs,
            loss=lambda logits: objective.loss(logits, batch),
            autocast_dtype=autocast_dtype(config, device),
            mode=mode,
        )
        memories.append(
            TrainingMemory(
                weights_bytes=_weights_bytes(config, rack, plan, device),
                gradients_bytes=param_bytes,
                optimizer_bytes=2 * param_bytes + _ADAM_STEP_BYTES * len(params),
                activations_bytes=activations,
            )
        )
    return memories


def rackwise_training_memory(
    config: StackWiseConfig, rack: nn.Module, device: torch.device | None = None
) -> TrainingMemory:
    """Training memory of training the skeleton `rack` end to end (a tied head tied again, as
    a rackwise run of the same config would have it)."""
    if config.model.tie_embeddings and not bool(getattr(rack, "tie_embeddings", True)):
        rack.lm_head.weight = rack.token_embedding.weight  # type: ignore[union-attr]
        rack.tie_embeddings = True  # type: ignore[assignment]
    return stage_training_memory(config, rack, [_rackwise_plan(rack)], device)[0]


def pool_rows(config: StackWiseConfig, plans: Sequence[StagePlan]) -> int:
    """Sequences in the sample pool of a depth-wise run (0: no pool)."""
    training = config.training
    if training.depthwise.data != "pool":
        return 0
    return pool_micro_batches(list(plans), training.grad_accum_steps) * training.batch_size


def pool_cache_bytes(config: StackWiseConfig, rows: int) -> int:
    """Bytes of the activation cache of `rows` sequences (one trunk output per token)."""
    training = config.training
    return rows * training.seq_len * config.model.d_model * ELEMENT_BYTES[training.cache.dtype]


def pool_token_bytes(config: StackWiseConfig, rows: int) -> int:
    """Bytes of the pool's corrupted batches: int64 inputs and targets (diffusion adds float32
    loss weights)."""
    per_token = 16 + (4 if config.training.objective == "diffusion" else 0)
    return rows * config.training.seq_len * per_token


def cached_stages(config: StackWiseConfig, plans: Sequence[StagePlan]) -> list[StagePlan]:
    """The stages that read the activation cache (depth-wise, after the first block)."""
    training = config.training
    if not training.cache.enabled or training.depthwise.data != "pool":
        return []
    return [p for p in plans if p.depthwise and not p.trains_embedding]


def cache_memory_allowance(
    config: StackWiseConfig,
    plans: Sequence[StagePlan],
    rack: nn.Module | None = None,
    device: torch.device | None = None,
    pool_bytes: int | None = None,
) -> int:
    """Bytes the activation cache may hold in memory without the depth-wise run needing more
    than rackwise training of the same rack: rackwise training memory - the largest training
    memory of a depth-wise stage - the pool's token ids (`pool_bytes`, default: as planned).

    `rack` is the rack being trained (its shape is used; nothing of it is touched), else the
    config's rack.
    """
    depthwise = [p for p in plans if p.depthwise]
    if not depthwise:
        return 0
    try:
        stages = stage_training_memory(config, skeleton(config, rack), depthwise, device)
        rackwise = rackwise_training_memory(config, skeleton(config, rack), device)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as error:
        # A forward that cannot run on fake tensors: keep the promise by caching on disk.
        warnings.warn(
            f"cannot estimate the training memory of this rack ({error}); the activation "
            "cache of `cache.location: auto` goes to disk",
            stacklevel=2,
        )
        return 0
    if pool_bytes is None:
        pool_bytes = pool_token_bytes(config, pool_rows(config, plans))
    largest = max(m.total_bytes for m in stages)
    return max(0, rackwise.total_bytes - largest - pool_bytes)


def pool_plan(config: StackWiseConfig) -> tuple[int, int]:
    """(sequences in the sample pool, bytes of its activation cache) of a run, planned on a
    skeleton; (0, 0) when the run caches nothing."""
    if not caches_pool(config):
        return 0, 0
    plans = plan_stages(config, skeleton(config))
    if not cached_stages(config, plans):
        return 0, 0
    rows = pool_rows(config, plans)
    return rows, pool_cache_bytes(config, rows)
