"""What a run needs, estimated before it runs: memory, disk, and whether it fits its device.

The planner (`stackwise.training.stages`) decides a run's stages; this module predicts what
they need, on a rack built on the meta device (`skeleton`: no memory, never the rack being
trained), and says when a run cannot fit. It imports the planner; the planner imports nothing
of it. Reading it does not import torch: a run whose config alone shows that it fits is never
estimated further, so validating ordinary files stays light.

1. *Sizes from the config*, pure arithmetic: the rack's parameters (`parameter_count`, exact,
   so a ``d_model: 1000000000`` is measured without building anything) and its vocabulary.
2. *The run estimate* (`estimate_run`): parameters, stage plan, tokens, FLOPs (by the trainer's
   rule, `stackwise.training.flops`) and memory in the parts a run reports.
3. *Training memory* of a stage (`stage_training_memory`) is what `stackwise.training.metrics`
   measures while it runs — weights, gradients, optimizer state and the activations saved for
   backward by one micro-batch — counted without allocating anything: the weights from the
   parameters' shapes, AdamW's state as two moments and a step count per trainable tensor,
   the activations by running the stage's forward and loss on fake tensors.
4. The *sample pool* of a depth-wise run is cached as ``rows x seq_len x d_model`` values of
   ``cache.dtype`` (`pool_cache_bytes`), plus its token ids in memory (`pool_token_bytes`).
   The *cache allowance* (`cache_memory_allowance`) is the memory depth-wise training may give
   the cache without using more than end-to-end training of the same rack would: the rackwise
   stage's training memory, less the largest depth-wise stage's, less the pool's token ids.
   With ``cache.location: auto`` a cache larger than that spills to a memory-mapped file.
5. The disk budget of a spilled pool is checked by `stackwise.training.disk_budget`, and
   whether a run fits its device by `stackwise.training.limits`; both import this module.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stackwise.config.base import BYTE_VOCAB_SIZE, StackWiseConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from stackwise.model.architecture import Rack
    from stackwise.training.metrics import TrainingMemory
    from stackwise.training.stages import StagePlan


# --------------------------------------------------------------------------------------------
# sizes from the config
# --------------------------------------------------------------------------------------------


ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}


def vocab_size_of(config: StackWiseConfig, vocab_size: int | None = None) -> int:
    """The vocabulary a run's rack is built with (config, else tokenizer, else the given one)."""
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    if vocab_size is not None:
        return vocab_size
    if config.data.tokenizer == "hf" and config.data.tokenizer_file is not None:
        from stackwise.data.tokenizer import file_vocab_size

        return file_vocab_size(config.data.tokenizer_file)
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
    for stack, spec in zip(model.resolved_stacks(), model.block_specs(), strict=True):
        n_heads, head_dim = spec.n_heads, spec.head_dim
        block = 2 * d + 3 * d * spec.d_ff
        if spec.attention_type == "mla":
            rope = spec.qk_rope_head_dim or 0
            kv_rank = spec.kv_lora_rank or 0
            q_width = n_heads * (head_dim + rope)
            q_rank = spec.q_lora_rank
            block += d * q_width if q_rank is None else d * q_rank + q_rank + q_rank * q_width
            block += d * (kv_rank + rope) + kv_rank + kv_rank * n_heads * 2 * head_dim
            block += n_heads * head_dim * d
        else:
            n_kv_heads = spec.n_kv_heads or n_heads
            block += d * (n_heads + 2 * n_kv_heads) * head_dim + n_heads * head_dim * d
        total += stack.n_blocks * block
    return total


def planned_compute(config: StackWiseConfig) -> float:
    """A run's training compute from its config alone (no torch): its FLOPs budget, else 6 FLOPs
    per parameter per trained token (end-to-end training's cost; a depth-wise run spends less).
    For weighing runs against each other (a grid's progress), not for reporting."""
    budget, training = config.training.budget, config.training
    if budget.flops is not None:
        return float(budget.flops)
    per_step = training.batch_size * training.grad_accum_steps * training.seq_len
    tokens = budget.tokens if budget.tokens is not None else (budget.steps or 0) * per_step
    return 6.0 * parameter_count(config) * tokens


# --------------------------------------------------------------------------------------------
# the run estimate
# --------------------------------------------------------------------------------------------


@dataclass
class StageEstimate:
    name: str
    trainable_parameters: int
    steps: int
    tokens: int
    flops: float
    training_memory_bytes: int = 0  # weights, gradients, optimizer state, saved activations


@dataclass
class RunEstimate:
    total_parameters: int
    stages: list[StageEstimate] = field(default_factory=list)
    flops: float = 0.0
    # Memory the run needs beyond the interpreter: the largest stage's training memory, plus
    # the activation cache held in memory and the sample pool's token ids where it has one.
    peak_memory_bytes: int = 0
    device: str = "cpu"
    training_memory_bytes: int = 0  # the largest stage's (`stackwise.training.memory`)
    cache_memory_bytes: int = 0  # activation cache (pool and validation) in RAM or on device
    cache_disk_bytes: int = 0  # activation cache spilled to disk
    note: str | None = None  # what could not be estimated, and why (peak is then a lower bound)


# Racks above these sizes are not built (even on the meta device) to plan a run: building
# takes about a millisecond per block, and a tensor over 2^61 elements overflows torch's size
# arithmetic. Their estimate counts the weights only.
MAX_PLANNED_BLOCKS = 1024
MAX_PLANNED_PARAMETERS = 10**15


def estimate_run(config: StackWiseConfig, vocab_size: int | None = None) -> RunEstimate:
    """Predict a run without training: parameters, stage plan, FLOPs and memory (training
    memory per stage, the activation cache in memory and on disk, and their sum).

    Never raises: a rack too large to plan, or a run whose stages cannot be planned, gets an
    estimate of a lower bound of its peak (its fp32 weights and one micro-batch's hidden states
    and logits) with a `note` saying why.
    """
    from stackwise.training.device import resolve_device

    try:
        device = str(resolve_device(config.training.device))
    except (RuntimeError, ValueError):
        device = config.training.device
    parameters = parameter_count(config, vocab_size)
    blocks = config.model.n_blocks
    note = None
    if blocks > MAX_PLANNED_BLOCKS or parameters > MAX_PLANNED_PARAMETERS:
        note = (
            f"too large to plan stage by stage ({blocks:,} blocks, {parameters:.3g} "
            f"parameters); only the weights and one batch are counted"
        )
    else:
        try:
            return _estimate_run(config, vocab_size)
        except Exception as error:  # an estimate must never stop `plan` or validation
            note = f"cannot plan the stages: {error}"
    return RunEstimate(
        total_parameters=parameters,
        peak_memory_bytes=memory_floor(config, vocab_size),
        device=device,
        note=note,
    )


def memory_floor(config: StackWiseConfig, vocab_size: int | None = None) -> int:
    """A lower bound of a run's peak memory, from its shapes alone (no torch): the fp32 weights,
    and one micro-batch's hidden states and logits."""
    training = config.training
    micro_tokens = training.batch_size * training.seq_len
    vocab = vocab_size_of(config, vocab_size)
    parameters = parameter_count(config, vocab_size)
    return 4 * parameters + 4 * micro_tokens * (config.model.d_model + vocab)


def _estimate_run(config: StackWiseConfig, vocab_size: int | None = None) -> RunEstimate:
    from stackwise.training.cache import choose_location
    from stackwise.training.device import resolve_device
    from stackwise.training.flops import stage_flops
    from stackwise.training.stages import plan_stages, pool_micro_batches, tokens_per_step

    rack = skeleton(config, vocab_size=vocab_size)
    plans = plan_stages(config, rack)
    training = config.training
    per_step = tokens_per_step(config)
    seq = training.seq_len
    pooled = training.depthwise.data == "pool"
    pool_steps = pool_micro_batches(plans, training.grad_accum_steps) if pooled else 0
    pool_tokens = pool_steps * training.batch_size * seq
    cached = training.cache.enabled and pooled
    estimate = RunEstimate(
        total_parameters=int(rack.get_parameter_count()),
        device=str(resolve_device(training.device)),
    )
    prefix_end = 0
    device = resolve_device(training.device)
    memory = stage_training_memory(config, rack, plans, device)
    for plan, stage_memory in zip(plans, memory, strict=True):
        tokens = plan.steps * per_step
        flops = stage_flops(
            rack,
            plan,
            seq,
            tokens=tokens,
            cached=cached,
            pool_tokens=pool_tokens,
            cache_from=prefix_end,
        )
        if plan.depthwise and cached:
            prefix_end = plan.start
        estimate.stages.append(
            StageEstimate(
                plan.name,
                plan.trainable_parameters,
                plan.steps,
                tokens,
                flops,
                stage_memory.total_bytes,
            )
        )
        estimate.flops += flops
    # The activation cache (sample pool and validation batches), where the trainer puts it.
    pool_ids = 0
    if cached_stages(config, plans):
        rows = pool_rows(config, plans)
        pool_ids = pool_token_bytes(config, rows)
        eval_rows = training.eval.batches * training.batch_size
        if training.objective == "diffusion":
            eval_rows *= training.eval.diffusion_t_points
        depthwise = [m for plan, m in zip(plans, memory, strict=True) if plan.depthwise]
        allowance = cache_memory_allowance(config, plans, rack, device, pool_ids, depthwise)
        for part in (pool_cache_bytes(config, rows), pool_cache_bytes(config, eval_rows)):
            where = choose_location(
                part, device, training.cache.location, training.cache.max_memory_gb, allowance
            )
            if where == "disk":
                estimate.cache_disk_bytes += part
            else:
                estimate.cache_memory_bytes += part
                allowance -= part
    elif pooled and any(p.depthwise for p in plans):
        pool_ids = pool_token_bytes(config, pool_rows(config, plans))
    estimate.training_memory_bytes = max(m.total_bytes for m in memory)
    estimate.peak_memory_bytes = estimate.training_memory_bytes + estimate.cache_memory_bytes
    estimate.peak_memory_bytes += pool_ids
    return estimate


# --------------------------------------------------------------------------------------------
# training memory and the activation cache
# --------------------------------------------------------------------------------------------


# AdamW's state per trainable tensor: exp_avg and exp_avg_sq (the tensor's size each) and a
# one-element float32 step count.
_ADAM_STEP_BYTES = 4


def autocast_dtype(config: StackWiseConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the trainer uses (CUDA with bf16/fp16 precision), else None."""
    import torch

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
    from stackwise.model.materialize import meta_device
    from stackwise.training.stages import prepare_rack

    if isinstance(rack, Rack):
        with meta_device():
            return Rack.from_spec(rack.spec())
    data = config.to_dict()
    data["model"]["vocab_size"] = vocab_size_of(config, vocab_size)
    with meta_device():
        built = create_rack_from_config(data)
    prepare_rack(config, built)
    return built


def _rackwise_plan(rack: nn.Module) -> StagePlan:
    from stackwise.training.stages import StagePlan

    n_blocks = len(list(getattr(rack, "blocks")))  # noqa: B009
    return StagePlan(0, "rack", "rack", 0, n_blocks, 1, 0.0, True, 0, False, 1)


def _trained(rack: nn.Module, plan: StagePlan, eligible: set[int]) -> list[nn.Parameter]:
    from stackwise.training.stages import trainable_parameters

    if plan.depthwise:
        return trainable_parameters(rack, plan.start, plan.end, plan.trains_embedding, eligible)
    unique = {id(p): p for p in rack.parameters()}
    return [p for p in unique.values() if id(p) in eligible]


def estimate_activation_bytes(*args: Any, **kwargs: Any) -> int:
    """`stackwise.training.metrics.estimate_activation_bytes` (torch is imported when first
    needed, not when this module is read)."""
    from stackwise.training import metrics

    return metrics.estimate_activation_bytes(*args, **kwargs)


#: Above this many tokens per micro-batch, a stage's saved activations are counted at smaller
#: shapes and extrapolated, so that estimating a run never allocates in proportion to its size
#: (`_extrapolated`).
EXACT_ACTIVATION_TOKENS = 2**16


def _extrapolated(count: Callable[[int, int], int], batch: int, length: int, step: int) -> int:
    """``count(batch, length)``, evaluated on at most `EXACT_ACTIVATION_TOKENS` tokens.

    What a forward saves for backward is linear in the batch size (every activation has a batch
    dimension; weights cast once do not) and at most quadratic in the sequence length (attention
    scores; everything else is linear). So a large shape is read off small ones: two batch sizes
    give the line in the batch size, and three lengths (multiples of `step`, the kernel
    attention's chunk) at batch 1 and 2 give the parabola in the length. Exact when the shape is
    small.
    """
    if batch * length <= EXACT_ACTIVATION_TOKENS:
        return count(batch, length)
    if 2 * length <= EXACT_ACTIVATION_TOKENS:
        small = EXACT_ACTIVATION_TOKENS // (2 * length)
        one, two = count(small, length), count(2 * small, length)
        return one + (two - one) * (batch - small) // small
    t = max(step, EXACT_ACTIVATION_TOKENS // 8 // step * step)
    x = length / t

    def in_length(b: int) -> float:
        # The parabola through lengths t, 2t, 4t (Lagrange form), at `length`.
        y1, y2, y4 = count(b, t), count(b, 2 * t), count(b, 4 * t)
        return y1 * (x - 2) * (x - 4) / 3 - y2 * (x - 1) * (x - 4) / 2 + y4 * (x - 1) * (x - 2) / 6

    at_one = in_length(1)
    return round(at_one + (in_length(2) - at_one) * (batch - 1))


def stage_training_memory(
    config: StackWiseConfig,
    rack: nn.Module,
    plans: Sequence[StagePlan],
    device: torch.device | None = None,
) -> list[TrainingMemory]:
    """Training memory of each of `plans` on the skeleton `rack` (see the module docstring)."""
    import torch

    from stackwise.model.attention import RotaryEmbedding
    from stackwise.training.fake_tensors import fake_tensor_mode
    from stackwise.training.metrics import TrainingMemory
    from stackwise.training.objectives import build_objective
    from stackwise.training.stages import eligible_parameters

    training = config.training
    device = device if device is not None else torch.device("cpu")
    vocab = int(rack.vocab_size)  # type: ignore[arg-type]
    # What a stage saves for backward depends on the objective, not on its settings.
    objective = build_objective(training.objective, vocab_size=vocab, mask_token_id=vocab - 1)
    eligible = eligible_parameters(rack)
    mode = fake_tensor_mode()
    weights = _Weights(config, rack, device)
    rack.train()
    memories = []
    counted: dict[tuple[Any, ...], int] = {}  # stages that run the same shapes save the same
    for plan in plans:
        params = _trained(rack, plan, eligible)
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        trainable = {id(p) for p in params}
        from_embedding = not plan.depthwise or plan.trains_embedding
        modules = rack.stage_modules(plan.start, plan.end)  # type: ignore[operator]

        def saved(
            batch_size: int,
            length: int,
            plan: StagePlan = plan,
            trainable: set[int] = trainable,
            modules: list[tuple[str, nn.Module]] = modules,
            from_embedding: bool = from_embedding,
        ) -> int:
            # Saved for backward is a view of the rotation table: counted by its storage, which
            # is as long as the longest sequence seen, so each count starts without one.
            for _, stage_module in modules:
                for module in stage_module.modules():
                    if isinstance(module, RotaryEmbedding):
                        module.clear_cache()
            ids = torch.zeros(batch_size, length, dtype=torch.long)
            batch = objective.corrupt(ids, torch.Generator().manual_seed(0))

            def count(blocks: list[int]) -> int:
                return estimate_activation_bytes(
                    rack,
                    plan.start,
                    plan.end,
                    from_embedding=from_embedding,
                    trainable=trainable,
                    batch=batch,
                    loss=objective.loss,
                    autocast_dtype=autocast_dtype(config, device),
                    mode=mode,
                    blocks=[plan.start + p for p in blocks],
                )

            return _over_depth(count, _identical_runs(modules, trainable))

        key = _stage_key(modules, trainable, from_embedding)
        if key not in counted:
            counted[key] = _extrapolated(
                saved, training.batch_size, training.seq_len, config.model.kernel.chunk_size
            )
        memories.append(
            TrainingMemory(
                weights_bytes=weights.on_device(plan),
                gradients_bytes=param_bytes,
                optimizer_bytes=2 * param_bytes + _ADAM_STEP_BYTES * len(params),
                activations_bytes=counted[key],
            )
        )
    return memories


#: A run of identical consecutive blocks longer than this is counted on this many of them and
#: extrapolated (`_over_depth`), so that estimating a deep rack never builds its whole graph.
#: At least 3: the first two blocks of a run differ from the rest (the first reads the previous
#: run's output, the rotation table is counted with the first block that saves it).
EXACT_ACTIVATION_RUN = 3


def _identical_runs(modules: list[tuple[str, nn.Module]], trainable: set[int]) -> list[list[int]]:
    """The stage's blocks (their positions among `modules`' blocks, from 0) in runs of
    consecutive blocks alike in kind, settings and tensors (`_stage_key` of each alone)."""
    blocks = [module for name, module in modules if name.startswith("stacks.")]
    runs: list[list[int]] = []
    previous = None
    for position, block in enumerate(blocks):
        key = _stage_key([("stacks.", block)], trainable, False)
        if runs and key == previous:
            runs[-1].append(position)
        else:
            runs.append([position])
        previous = key
    return runs


def _over_depth(count: Callable[[list[int]], int], runs: list[list[int]]) -> int:
    """``count`` of all the blocks of `runs`, from at most `EXACT_ACTIVATION_RUN` of each run.

    What a forward saves is a sum over its blocks: a block saves its input (the previous block's
    output) and what it computes, and the rotation table, shared by all, is counted once. So in
    a run of identical blocks every block after the first two adds the same bytes, which the
    third one measures; each run longer than `EXACT_ACTIVATION_RUN` adds that many times its
    blocks beyond it. ``count`` takes block positions (from 0) among the stage's blocks.
    """
    kept = [run[:EXACT_ACTIVATION_RUN] for run in runs]
    base = count([p for run in kept for p in run])
    total = base
    for index, run in enumerate(runs):
        beyond = len(run) - EXACT_ACTIVATION_RUN
        if beyond > 0:
            fewer = [p for i, r in enumerate(kept) for p in (r[:-1] if i == index else r)]
            total += beyond * (base - count(fewer))
    return total


def _stage_key(
    modules: list[tuple[str, nn.Module]], trainable: set[int], from_embedding: bool
) -> tuple[Any, ...]:
    """What a stage's saved activations depend on: where its forward starts, and the kind,
    settings and tensors (shape, dtype, trained or not, shared or not) of each module it runs.
    Stages with equal keys save the same bytes (the blocks of a deep blockwise run)."""
    position: dict[int, int] = {}
    parts: list[Any] = [from_embedding]
    for name, module in modules:
        role = "block" if name.startswith("stacks.") else name
        tensors = tuple(
            (
                tensor_name,
                tuple(tensor.shape),
                str(tensor.dtype),
                id(tensor) in trainable,
                position.setdefault(id(tensor), len(position)),
            )
            for tensor_name, tensor in [
                *module.named_parameters(remove_duplicate=False),
                *module.named_buffers(remove_duplicate=False),
            ]
        )
        kinds = tuple(type(m).__name__ for m in module.modules())
        parts.append((role, repr(getattr(module, "_spec", None)), kinds, tensors))
    return tuple(parts)


class _Weights:
    """Parameters and buffers on the training device of any stage (`on_device`), from one pass
    over the rack: a depth-wise stage holds its frozen trunk (the blocks before it) in
    ``frozen_precision``, and off an accelerator with ``offload_frozen``."""

    def __init__(self, config: StackWiseConfig, rack: nn.Module, device: torch.device) -> None:
        training = config.training
        self.frozen_bytes = ELEMENT_BYTES[training.frozen_precision]
        self.offload = training.offload_frozen and device.type != "cpu"
        seen: set[int] = set()
        self.total = 0
        for tensor in [*rack.parameters(), *rack.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                self.total += tensor.numel() * tensor.element_size()
        # Running sums over the blocks in depth order, each tensor counted at its first block:
        # bytes of floating-point tensors as stored, their elements, bytes of the others.
        self.float_bytes, self.float_elements, self.other_bytes = [0], [0], [0]
        counted: set[int] = set()
        for block in list(getattr(rack, "blocks")):  # noqa: B009
            float_bytes = float_elements = other_bytes = 0
            for tensor in [*block.parameters(), *block.buffers()]:
                if id(tensor) in counted:
                    continue
                counted.add(id(tensor))
                if tensor.is_floating_point():
                    float_bytes += tensor.numel() * tensor.element_size()
                    float_elements += tensor.numel()
                else:
                    other_bytes += tensor.numel() * tensor.element_size()
            self.float_bytes.append(self.float_bytes[-1] + float_bytes)
            self.float_elements.append(self.float_elements[-1] + float_elements)
            self.other_bytes.append(self.other_bytes[-1] + other_bytes)

    def on_device(self, plan: StagePlan) -> int:
        if not plan.depthwise:
            return self.total
        k = plan.start
        if self.offload:
            return self.total - self.float_bytes[k] - self.other_bytes[k]
        return self.total - self.float_bytes[k] + self.float_elements[k] * self.frozen_bytes


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
    from stackwise.training.stages import pool_micro_batches

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
    stages: Sequence[TrainingMemory] | None = None,
) -> int:
    """Bytes the activation cache may hold in memory without the depth-wise run needing more
    than rackwise training of the same rack: rackwise training memory - the largest training
    memory of a depth-wise stage - the pool's token ids (`pool_bytes`, default: as planned).

    `rack` is the rack being trained (its shape is used; nothing of it is touched), else the
    config's rack. `stages`: the training memory of the depth-wise plans, where already
    estimated (`stage_training_memory`).
    """
    depthwise = [p for p in plans if p.depthwise]
    if not depthwise:
        return 0
    try:
        if stages is None:
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


def caches_pool(config: StackWiseConfig) -> bool:
    """Whether the run caches a sample pool (depth-wise, `depthwise.data: pool`, cache on)."""
    training = config.training
    return training.is_depthwise and training.depthwise.data == "pool" and training.cache.enabled


def pool_plan(config: StackWiseConfig) -> tuple[int, int]:
    """(sequences in the sample pool, bytes of its activation cache) of a run, planned on a
    skeleton; (0, 0) when the run caches nothing."""
    from stackwise.training.stages import plan_stages

    if not caches_pool(config):
        return 0, 0
    plans = plan_stages(config, skeleton(config))
    if not cached_stages(config, plans):
        return 0, 0
    rows = pool_rows(config, plans)
    return rows, pool_cache_bytes(config, rows)
