"""The typed configuration of one StackWise run.

`StackWiseConfig` holds four sections — `model`, `training`, `data`, `tracking` — each a strict
pydantic model: unknown keys are rejected, every field carries its constraints and help text,
and assignments are validated (``config.training.training_architecture = "blockwise"`` is checked
just like a YAML value). The JSON Schema in ``schemas/`` is generated from these classes, so the
field descriptions here are also the editor documentation of experiment files.

Only pydantic/yaml and the YAML loader (`stackwise.config.loading`) are imported here, so
validating a file never imports torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from stackwise.config.loading import load_validated

AttentionType = Literal["mha", "gqa", "mla", "kernel"]
AttentionMode = Literal["bidirectional", "causal"]
TrainingArchitecture = Literal["rackwise", "stackwise", "blockwise", "progressive"]
# Modes with a frozen, cached trunk under the piece being trained.
DEPTHWISE_MODES = ("stackwise", "blockwise")
Objective = Literal["clm", "mlm", "diffusion"]
Precision = Literal["fp32", "bf16", "fp16"]
# Frozen pieces may also be held as int8 weights (weight-only quantization, torchao).
FrozenPrecision = Literal["fp32", "bf16", "fp16", "int8"]

# Settings that cannot change what a run computes, left out of its identity (`config_hash`):
# where it is recorded, checkpoint and log cadence, and where the exact activation cache lives.
# (`training.device` stays: without torch, `auto` cannot be told from `cpu`. A tracked run's
# identity replaces it with the device type it resolves to, see `stackwise.identity`.)
NOT_IDENTITY: tuple[tuple[str, ...], ...] = (
    ("tracking",),
    ("training", "checkpoint"),
    ("training", "log_every_steps"),
    ("training", "cache", "location"),
    ("training", "cache", "directory"),
    ("training", "cache", "max_memory_gb"),
    ("training", "cache", "max_disk_gb"),
)

# Size of the built-in byte-level tokenizer: 256 byte values + [PAD], [MASK], [BOS], [EOS].
BYTE_VOCAB_SIZE = 260


def _number_kinds(annotation: Any) -> set[type]:
    """The plain number types (int, float) an annotation such as `int | None` accepts."""
    if annotation in (int, float):
        return {annotation}
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return {a for a in typing.get_args(annotation) if a in (int, float)}
    return set()


def _item_kinds(annotation: Any) -> set[type]:
    """The number types of the items of `list[float]`, `tuple[float, float]` and the like."""
    if typing.get_origin(annotation) in (list, tuple):
        return {a for a in typing.get_args(annotation) if a in (int, float)}
    return set()


def _plain_number(value: Any, kinds: set[type]) -> Any:
    """Numbers as a user means them: a boolean is not a number, nor is a string (`'1e-3'` in
    quotes: the YAML loader reads `1e-3` unquoted as a float), an integral float (`1e6`) is a
    whole number, and `1.5` is not."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not a boolean (got {str(value).lower()})")
    if isinstance(value, str):
        raise ValueError(f"must be a number, not a string (got {value!r}); write it without quotes")
    if int not in kinds or float in kinds:
        return value  # float fields: pydantic parses; non-finite values are refused by config
    number = value
    if isinstance(number, float):
        if not math.isfinite(number):
            raise ValueError(f"must be a finite whole number, got {value}")
        if not number.is_integer():
            raise ValueError(f"must be a whole number, got {value}")
        return int(number)
    return value


class BaseConfig(BaseModel):
    """Common behaviour of every config section: strict keys, validated assignment, and one
    number policy: every float is finite, booleans are not numbers, and integer fields take
    integral floats (`max_tokens: 1e6`) but not fractional ones."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        kinds = _number_kinds(field.annotation)
        if kinds and value is not None:
            return _plain_number(value, kinds)
        items = _item_kinds(field.annotation)
        if items and isinstance(value, list | tuple):
            return type(value)(_plain_number(item, items) for item in value)
        return value

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict of this section (round-trips through `model_validate`)."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


class ArchitectureConfig(BaseConfig):
    """How many stacks the rack has and how many blocks each holds (used when `stacks` is unset)."""

    n_stacks: int = Field(2, ge=1, le=1024, description="Number of stacks in the rack.")
    blocks_per_stack: int = Field(4, ge=1, le=1024, description="Number of blocks in each stack.")


class MLAConfig(BaseConfig):
    """Multi-head latent attention (DeepSeek-V2) options; used when attention_type is `mla`."""

    kv_lora_rank: int | None = Field(
        None, ge=1, description="Width of the shared compressed K/V latent (default: d_model // 4)."
    )
    q_lora_rank: int | None = Field(
        None, ge=1, description="Width of the compressed query (null: queries are not compressed)."
    )
    rope_head_dim: int | None = Field(
        None,
        ge=2,
        description="Width of the decoupled RoPE key/query part, shared across heads "
        "(default: head_dim // 2, at least 2; must be even).",
    )


class KernelConfig(BaseConfig):
    """Linear (kernel) attention options; used when attention_type is `kernel`."""

    feature_map: Literal["elu", "favor"] = Field(
        "elu",
        description="Positive feature map: `elu` (elu+1) or `favor` (FAVOR+ random features).",
    )
    n_features: int | None = Field(
        None,
        ge=1,
        description="Number of FAVOR+ random features (default: about head_dim·ln(head_dim), "
        "rounded to an even number, at least 2; must be even with RoPE).",
    )
    chunk_size: int = Field(64, ge=1, description="Chunk length of the causal prefix-sum scan.")
    seed: int = Field(0, ge=0, description="Seed of the FAVOR+ random projection.")
    redraw_every: int | None = Field(
        None,
        ge=1,
        description="Redraw the FAVOR+ projection every this many optimizer steps, "
        "deterministically from seed and step (null: never).",
    )
    favor_sampling: Literal["orthogonal", "antithetic", "regularized"] = Field(
        "regularized",
        description="How FAVOR+ draws its projection: `regularized` (pairs ±w with norm "
        "sqrt(head_dim): lowest error, slightly biased), `antithetic` (pairs ±w with Gaussian "
        "norms: unbiased) or `orthogonal` (the Performer's FAVOR+: unbiased, highest error).",
    )


class BlockOverrides(BaseConfig):
    """Per-stack overrides of the block specification (anything unset inherits from `model`)."""

    attention_type: AttentionType | None = None
    attention_mode: AttentionMode | None = None
    n_heads: int | None = Field(None, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)
    d_ff: int | None = Field(None, ge=1)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    freeze_up_proj: bool | None = None


class StackConfig(BlockOverrides):
    """One stack of an explicitly listed (possibly mixed) rack."""

    n_blocks: int = Field(..., ge=1, le=1024, description="Number of blocks in this stack.")
    freeze_blocks: bool = Field(
        False, description="Declared frozen: never trained (keeps its seeded initialisation)."
    )
    budget_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Share of the depth-wise training budget for this stack's stage(s) "
        "(stacks without one share what is left equally).",
    )
    lr: float | None = Field(None, gt=0.0, description="Learning rate for this stack's stage(s).")


class ModelConfig(BaseConfig):
    """Architecture of the Rack: dimensions, attention, and how blocks group into stacks."""

    vocab_size: int | None = Field(
        None, ge=2, description="Vocabulary size (null: taken from the tokenizer)."
    )
    d_model: int = Field(512, ge=8, description="Width of the residual stream.")
    n_heads: int = Field(8, ge=1, description="Number of query heads.")
    n_kv_heads: int | None = Field(
        None, ge=1, description="Number of key/value heads for gqa (null: same as n_heads)."
    )
    d_ff: int | None = Field(
        None, ge=1, description="Hidden width of the SwiGLU FFN (null: derived from d_model)."
    )
    attention_type: AttentionType = Field("mha", description="Attention: mha, gqa, mla or kernel.")
    attention_mode: AttentionMode = Field(
        "causal", description="`causal` (left-to-right) or `bidirectional` attention."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability.")
    use_rope: bool = Field(True, description="Rotary position embeddings on queries and keys.")
    rope_theta: float = Field(10000.0, gt=0.0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-5, gt=0.0, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(True, description="Share the token embedding and LM head weights.")
    freeze_up_proj: bool = Field(
        False, description="Keep every FFN up projection at its seeded random initialisation."
    )
    init_std: float = Field(0.02, gt=0.0, description="Standard deviation of weight init.")
    mla: MLAConfig = Field(default_factory=MLAConfig)
    kernel: KernelConfig = Field(default_factory=KernelConfig)
    architecture: ArchitectureConfig = Field(default_factory=ArchitectureConfig)
    stacks: list[StackConfig] | None = Field(
        None,
        min_length=1,
        description="Explicit stacks (overrides `architecture`): per stack its block count, "
        "block overrides, freeze_blocks and depth-wise training overrides.",
    )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def uses_favor(self) -> bool:
        """Whether some stack has kernel attention with FAVOR+ features."""
        return self.kernel.feature_map == "favor" and any(
            (stack.attention_type or self.attention_type) == "kernel"
            for stack in self.resolved_stacks()
        )

    def resolved_stacks(self) -> list[StackConfig]:
        """The stacks of the rack, whether listed explicitly or given by `architecture`."""
        if self.stacks is not None:
            return list(self.stacks)
        return [
            StackConfig(n_blocks=self.architecture.blocks_per_stack)
            for _ in range(self.architecture.n_stacks)
        ]

    @property
    def n_blocks(self) -> int:
        return sum(s.n_blocks for s in self.resolved_stacks())

    @model_validator(mode="after")
    def _check_dimensions(self) -> ModelConfig:
        for index, stack in enumerate(self.resolved_stacks()):
            where = f"stacks.{index}." if self.stacks is not None else ""
            n_heads = stack.n_heads or self.n_heads
            n_kv_heads = stack.n_kv_heads or self.n_kv_heads or n_heads
            heads_field = f"{where}n_heads" if stack.n_heads else "n_heads"
            if self.d_model % n_heads:
                raise ValueError(
                    f"{heads_field}: d_model ({self.d_model}) must be divisible by "
                    f"n_heads ({n_heads})"
                )
            if n_heads % n_kv_heads:
                kv_field = f"{where}n_kv_heads" if stack.n_kv_heads else "n_kv_heads"
                raise ValueError(
                    f"{kv_field}: n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})"
                )
            head_dim = self.d_model // n_heads
            attention = stack.attention_type or self.attention_type
            if self.use_rope and attention in ("mha", "gqa", "kernel") and head_dim % 2:
                raise ValueError(
                    f"{heads_field}: RoPE needs an even head dimension, "
                    f"d_model/n_heads = {head_dim}"
                )
            features = self.kernel.n_features
            favor = attention == "kernel" and self.kernel.feature_map == "favor"
            if favor and self.use_rope and features is not None and features % 2:
                raise ValueError(
                    f"kernel.n_features: RoPE rotates features in pairs, so it must be "
                    f"even, got {features}"
                )
            if attention == "mla":
                rope_dim = self.mla.rope_head_dim
                if rope_dim is not None and rope_dim % 2:
                    raise ValueError(f"mla.rope_head_dim: must be even, got {rope_dim}")
                if self.mla.kv_lora_rank is not None and self.mla.kv_lora_rank > self.d_model:
                    raise ValueError(
                        f"mla.kv_lora_rank: must be at most d_model ({self.d_model}), "
                        f"got {self.mla.kv_lora_rank}"
                    )
                if self.mla.q_lora_rank is not None and self.mla.q_lora_rank > self.d_model:
                    raise ValueError(
                        f"mla.q_lora_rank: must be at most d_model ({self.d_model}), "
                        f"got {self.mla.q_lora_rank}"
                    )
        if self.stacks is not None:
            shares = [s.budget_fraction for s in self.stacks if s.budget_fraction is not None]
            if sum(shares) > 1.0 + 1e-9:
                raise ValueError(
                    f"stacks: budget_fraction values add up to {sum(shares):g}, more than 1"
                )
        return self


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


class OptimizerConfig(BaseConfig):
    """AdamW settings (fused on CUDA)."""

    name: Literal["adamw"] = "adamw"
    lr: float = Field(3e-4, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.1, ge=0.0, description="Decoupled weight decay (matrices only).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0, description="Max gradient norm (null: off).")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas


class ScheduleConfig(BaseConfig):
    """Learning-rate schedule of each training stage: linear warmup, then decay."""

    name: Literal["cosine", "linear", "constant"] = Field("cosine")
    warmup_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Fraction of each stage's steps spent warming up."
    )
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Final learning rate as a fraction of the peak."
    )


class BudgetConfig(BaseConfig):
    """Total training budget of a run: optimizer steps, tokens or executed FLOPs (exactly one)."""

    steps: int | None = Field(None, gt=0, description="Total optimizer steps over all stages.")
    tokens: int | None = Field(None, gt=0, description="Total training tokens over all stages.")
    flops: float | None = Field(
        None,
        gt=0.0,
        description="Total executed training FLOPs over all stages (trainable pieces 3x forward, "
        "frozen trunk forward where it runs, cache building included): compute-matched "
        "comparisons. Each run ends within one optimizer step of it.",
    )
    split: Literal["equal", "by_params"] = Field(
        "equal",
        description="How the budget splits across depth-wise stages: `equal`, or `by_params` "
        "(proportional to each piece's trainable parameters).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> BudgetConfig:
        given = [self.steps is not None, self.tokens is not None, self.flops is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of budget.steps, budget.tokens or budget.flops")
        return self


class DepthwiseConfig(BaseConfig):
    """How depth-wise (stackwise / blockwise) stages train; ignored by rackwise runs."""

    head: Literal["untie", "fresh", "frozen"] = Field(
        "untie",
        description="LM head in depth-wise runs. `untie`: with tied embeddings the head becomes "
        "its own parameter (initialised from the embedding) when training starts and every "
        "stage trains it with its piece. `fresh`: like untie, but each stage starts from a new "
        "head copied from the embedding (greedy layer-wise training with per-stage heads). "
        "`frozen`: a tied head stays the embedding, trained in the first stage only (ablation).",
    )
    init: Literal["random", "copy_previous"] = Field(
        "random",
        description="How piece k starts: `random` (seeded initialisation) or `copy_previous` "
        "(a copy of trained piece k-1, progressive stacking; pieces must have the same shape).",
    )
    data: Literal["pool", "fresh"] = Field(
        "pool",
        description="`pool`: every stage revisits one sample pool whose trunk output is cached "
        "(cost linear in depth). `fresh`: each stage reads new batches from the data stream and "
        "runs the frozen trunk on them (no cache; its FLOPs count).",
    )


class EvalConfig(BaseConfig):
    """Held-out evaluation cadence."""

    every_steps: int | None = Field(
        None, gt=0, description="Evaluate every N global steps (always at each stage end)."
    )
    batches: int = Field(8, ge=1, description="Validation batches per evaluation.")
    diffusion_t_points: int = Field(
        8,
        ge=1,
        le=1024,
        description="Nodes K of the midpoint rule with which the diffusion objective's validation "
        "NELBO (the integral over t in (0, 1] of the expected 1/t-weighted masked-token loss per "
        "token) is computed: mask ratios t_k = (k - 1/2)/K, k = 1..K, one fixed-seed mask draw "
        "per validation batch and node. Reported as val/nelbo (nats per token) and "
        "val/ppl_bound = exp(nelbo).",
    )


class CheckpointConfig(BaseConfig):
    """When checkpoints are written (always at each stage end when a directory is set)."""

    every_steps: int | None = Field(None, gt=0, description="Checkpoint every N global steps.")
    every_minutes: float | None = Field(
        10.0,
        gt=0.0,
        allow_inf_nan=False,
        description="Also checkpoint after this many minutes of training since the last "
        "checkpoint (null: off), so a hard kill loses at most that much.",
    )
    keep_last: int = Field(2, ge=1, description="How many step checkpoints to keep.")


class CacheConfig(BaseConfig):
    """Activation cache of the frozen trunk during depth-wise training."""

    enabled: bool = Field(True, description="Cache the frozen prefix's output (exact).")
    location: Literal["auto", "device", "cpu", "disk"] = Field(
        "auto",
        description="Where the cache lives. `auto`: in host memory when it fits both "
        "max_memory_gb and what end-to-end training of the same rack would use beyond the "
        "depth-wise stage itself, else in a memory-mapped file read ahead in order; never on an "
        "accelerator. `device` keeps it on the accelerator, `cpu` in (pinned) host memory, "
        "`disk` in the file.",
    )
    max_memory_gb: float = Field(
        4.0, gt=0.0, description="Largest cache `auto` keeps in host memory before using disk."
    )
    max_disk_gb: float | None = Field(
        None,
        gt=0.0,
        description="Largest sample-pool cache allowed on disk, checked before a run starts "
        "(default: half the free disk where the cache is written).",
    )
    dtype: Precision = Field("fp32", description="Storage precision of cached activations.")
    directory: str | None = Field(
        None,
        description="Folder for the disk cache (default: beside the run's checkpoints, or a "
        "temporary folder when there are none).",
    )


class FusionConfig(BaseConfig):
    """Optional joint fine-tuning of all non-frozen pieces after depth-wise training."""

    enabled: bool = False
    steps: int | None = Field(None, gt=0)
    tokens: int | None = Field(None, gt=0)
    flops_fraction: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Share of training.budget.flops spent on the fusion phase (the depth-wise "
        "stages share the rest), so a run with fusion stays compute-matched.",
    )
    lr: float | None = Field(
        None, gt=0.0, description="Learning rate (default: optimizer.lr / 10)."
    )

    @model_validator(mode="after")
    def _budget_when_enabled(self) -> FusionConfig:
        given = [self.steps, self.tokens, self.flops_fraction]
        if self.enabled and sum(v is not None for v in given) != 1:
            raise ValueError(
                "an enabled fusion phase needs exactly one of steps, tokens or flops_fraction"
            )
        return self


class PowerLengths(BaseConfig):
    """Stage i of n gets a share proportional to i**power (MIDAS-style growing stages)."""

    power: float = Field(..., ge=0.0, le=8.0, description="Exponent of the stage index.")


class GrowthConfig(BaseConfig):
    """How a `progressive` run grows its rack; ignored by the other modes."""

    init: Literal["copy_last", "copy_middle", "random"] = Field(
        "copy_last",
        description="How a new stack starts: `copy_last` (a copy of the last trained stack, "
        "StackBERT), `copy_middle` (a copy of the middle trained stack inserted after it, "
        "MIDAS) or `random` (its seeded initialisation).",
    )
    schedule: Literal["per_stack", "doubling"] = Field(
        "per_stack",
        description="`per_stack`: one new stack per stage; `doubling`: 1 -> 2 -> 4 ... stacks, "
        "the trained trunk copied on top of itself (StackBERT / G_stack; needs a power-of-two "
        "number of stacks).",
    )
    lengths: Literal["equal", "by_params"] | PowerLengths = Field(
        "equal",
        description="How the budget splits over the growth stages: `equal`, `by_params` "
        "(proportional to each stage's trainable parameters) or `{power: a}` (stage i of n "
        "proportional to i**a).",
    )
    rewarm_fraction: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Learning-rate warmup of every stage after the first, as a fraction of its "
        "steps (null: schedule.warmup_fraction).",
    )


class TrainingConfig(BaseConfig):
    """How a Rack is trained."""

    training_architecture: TrainingArchitecture = Field(
        "rackwise",
        # `layerwise` is accepted (and stored as `blockwise`); list it so editors accept it too.
        json_schema_extra={
            "enum": ["rackwise", "stackwise", "blockwise", "layerwise", "progressive"]
        },
        description="`rackwise` (end to end), `stackwise` (one stage per stack), `blockwise` "
        "(one stage per block; `layerwise` is accepted as the same thing) or `progressive` "
        "(grow the rack stack by stack, every layer trainable: see `growth`).",
    )
    objective: Objective = Field(
        "clm",
        description="`clm` (next token), `mlm` (BERT masking) or `diffusion` (masked diffusion).",
    )
    mlm_probability: float = Field(
        0.15, gt=0.0, lt=1.0, description="Fraction of tokens selected by the mlm objective."
    )
    mask_ratio_min: float = Field(
        1e-3,
        gt=0.0,
        lt=1.0,
        description="Lower end of the diffusion mask ratio t ~ U[min, max] during training: the "
        "epsilon of MDLM/LLaDA's t ~ U(eps, 1], keeping the 1/t loss weight finite.",
    )
    mask_ratio_max: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Upper end of the diffusion mask ratio t ~ U[min, max] during training; 1.0 "
        "(the default) lets the model see fully masked sequences, where generation starts.",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    budget: BudgetConfig = Field(default_factory=lambda: BudgetConfig(steps=200))
    batch_size: int = Field(16, ge=1, description="Sequences per optimizer micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    seq_len: int = Field(128, ge=2, description="Tokens per training sequence.")
    precision: Precision = Field(
        "fp32", description="Autocast precision on accelerators (CPU always trains in fp32)."
    )
    frozen_precision: FrozenPrecision = Field(
        "fp32",
        description="How frozen pieces are held during depth-wise training: fp32, bf16, fp16, or "
        "int8 (weight-only quantization of their linear layers with torchao: `pip install "
        "stackwise[quant]`). It matters where the trunk is re-run (depthwise.data: fresh, or "
        "the cache off) and it changes the trunk's output, so it is part of a run's identity.",
    )
    offload_frozen: bool = Field(
        True, description="Move frozen pieces off the accelerator once their output is cached."
    )
    compile: bool = Field(False, description="Wrap the trainable piece in torch.compile.")
    deterministic: bool = Field(
        False,
        description="Train with torch.use_deterministic_algorithms(True), restored afterwards: "
        "what makes CUDA runs bitwise repeatable (slower; an operation without a deterministic "
        "kernel raises an error). On CUDA set the environment variable "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8) before the process starts, as cuBLAS "
        "requires; the run stops with an error otherwise. CPU training is deterministic "
        "without it.",
    )
    device: str = Field("auto", description="`auto` (cuda, then mps, then cpu), or a torch device.")
    seed: int = Field(0, ge=0, description="Seed of initialisation, data order and masking.")
    log_every_steps: int = Field(10, ge=1, description="Metric logging cadence in steps.")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    depthwise: DepthwiseConfig = Field(default_factory=DepthwiseConfig)
    growth: GrowthConfig = Field(default_factory=GrowthConfig)
    out_of_core: bool = Field(
        False,
        description="Depth-wise training with only the running piece, the embedding and the "
        "readout in memory: blocks are drawn when their stage starts, written to safetensors "
        "in the run's folder when it ends, and the activation cache lives on disk. Memory no "
        "longer grows with depth. stackwise/blockwise with depthwise.data: pool and the cache "
        "on.",
    )

    @property
    def is_depthwise(self) -> bool:
        """Stackwise or blockwise: pieces trained one at a time on a frozen trunk."""
        return self.training_architecture in DEPTHWISE_MODES

    # The user's word for the mode when it differs from the stored one (`layerwise`): kept for
    # tables, tags and logs; the stored value (and so the run's identity) stays `blockwise`.
    _mode_word: str | None = PrivateAttr(None)

    @field_validator("training_architecture", mode="before")
    @classmethod
    def _layerwise_is_blockwise(cls, value: Any) -> Any:
        return "blockwise" if value == "layerwise" else value

    @model_validator(mode="wrap")
    @classmethod
    def _remember_mode_word(cls, data: Any, handler: Any) -> Any:
        word = data.get("training_architecture") if isinstance(data, dict) else None
        config = handler(data)
        if isinstance(config, TrainingConfig) and isinstance(data, dict):
            config._mode_word = "layerwise" if word == "layerwise" else None
        return config

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "training_architecture":
            self._mode_word = "layerwise" if value == "layerwise" else None

    def __eq__(self, other: object) -> bool:
        # The user's word is a label, not part of the config: layerwise == blockwise.
        if not isinstance(other, TrainingConfig):
            return NotImplemented
        return self.__dict__ == other.__dict__

    @property
    def mode_label(self) -> str:
        """The training mode as the user wrote it (`layerwise` stays `layerwise`)."""
        if self._mode_word is not None and self.training_architecture == "blockwise":
            return self._mode_word
        return self.training_architecture

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        kind = value.split(":", 1)[0]
        if kind not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("frozen_precision")
    @classmethod
    def _int8_needs_torchao(cls, value: str) -> str:
        import importlib.util

        if value == "int8" and importlib.util.find_spec("torchao") is None:
            raise ValueError(
                "int8 frozen pieces need torchao: pip install 'stackwise[quant]' (or torchao)"
            )
        return value

    @model_validator(mode="after")
    def _mask_range(self) -> TrainingConfig:
        if self.mask_ratio_min >= self.mask_ratio_max:
            raise ValueError(
                f"mask_ratio_min: mask_ratio_min ({self.mask_ratio_min}) must be less than "
                f"mask_ratio_max ({self.mask_ratio_max})"
            )
        return self


# --------------------------------------------------------------------------------------------
# data and tracking
# --------------------------------------------------------------------------------------------


class DataConfig(BaseConfig):
    """Where training text comes from and how it is tokenized."""

    source: Literal["builtin", "stdlib", "files"] = Field(
        "builtin",
        description="`builtin` (English text shipped with Python: pydoc_data.topics, 0.47 MB), "
        "`stdlib` (the built-in text plus the standard library's source, about 12 MB; no "
        "download) or `files`.",
    )
    paths: list[str] = Field(
        default_factory=list,
        description="Text (.txt/.md…), JSONL or Parquet files or globs, for source `files`.",
    )
    format: Literal["auto", "text", "jsonl", "parquet"] = Field(
        "auto", description="File format (auto: from the extension)."
    )
    text_column: str = Field("text", description="Text column of JSONL/Parquet files.")
    tokenizer: Literal["byte", "bpe"] = Field(
        "byte", description="`byte` (no training needed) or `bpe` (trained locally on the corpus)."
    )
    bpe_vocab_size: int = Field(4096, ge=300, description="Vocabulary size of a trained BPE.")
    val_fraction: float = Field(
        0.05, gt=0.0, lt=0.5, description="Held-out fraction for validation (deterministic)."
    )
    test_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=0.5,
        description="Held-out fraction for the final test loss (`test/loss`), taken like the "
        "validation split and never seen by training or by choices made on validation loss "
        "(0: no test split).",
    )
    split_seed: int = Field(
        0,
        ge=0,
        description="Seed of the document shuffle that decides the train/validation/test "
        "split (and what `max_tokens` keeps); independent of training.seed, so replicate "
        "seeds share one split.",
    )
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="Use at most this many corpus tokens (null: all). With bpe it counts UTF-8 "
        "bytes, applied before the tokenizer is trained on what is kept.",
    )

    @model_validator(mode="after")
    def _paths_for_files(self) -> DataConfig:
        if self.source == "files" and not self.paths:
            raise ValueError("paths: source `files` needs at least one path or glob")
        if self.val_fraction + self.test_fraction >= 0.5:
            raise ValueError(
                f"test_fraction: val_fraction + test_fraction must stay below 0.5 "
                f"(got {self.val_fraction} + {self.test_fraction})"
            )
        return self


class TrackingConfig(BaseConfig):
    """Where and how runs are recorded in MLflow."""

    uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a SQLite store "
        "in ./mlruns).",
    )
    experiment_name: str | None = Field(
        None, description="MLflow experiment (default: the experiment file's name)."
    )
    log_model: bool = Field(True, description="Log the trained Rack as an MLflow model.")
    system_metrics: bool = Field(False, description="Record CPU/GPU/memory system metrics.")


# --------------------------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------------------------


class StackWiseConfig(BaseConfig):
    """Everything needed to build, train and track one run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _objective_fits_attention(self) -> StackWiseConfig:
        if self.training.objective == "clm":
            for index, stack in enumerate(self.model.resolved_stacks()):
                mode = stack.attention_mode or self.model.attention_mode
                if mode != "causal":
                    field = (
                        f"model.stacks.{index}.attention_mode"
                        if self.model.stacks is not None and stack.attention_mode
                        else "model.attention_mode"
                    )
                    raise ValueError(
                        f"{field}: objective `clm` needs causal attention in every stack "
                        f"(a bidirectional block would see the token it predicts); use "
                        f"attention_mode: causal or objective mlm/diffusion"
                    )
        return self

    @model_validator(mode="after")
    def _no_frozen_last_stack_depthwise(self) -> StackWiseConfig:
        if not self.training.is_depthwise:
            return self
        stacks = self.model.resolved_stacks()
        if stacks[-1].freeze_blocks and not all(s.freeze_blocks for s in stacks):
            index = len(stacks) - 1
            raise ValueError(
                f"model.stacks.{index}.freeze_blocks: the last stack cannot be declared frozen "
                f"in depth-wise training (stackwise, blockwise/layerwise): its random blocks "
                f"would sit between the last trained piece and the readout, which is trained "
                f"without them; freeze an earlier stack or train rackwise"
            )
        return self

    def stage_count(self) -> int:
        """Number of stages the budget is split over (the fusion phase has its own budget)."""
        stacks = [s for s in self.model.resolved_stacks() if not s.freeze_blocks]
        mode = self.training.training_architecture
        if mode == "rackwise":
            return 1
        if mode == "stackwise":
            return len(stacks)
        if mode == "progressive":
            return len(self.growth_sizes())
        return sum(s.n_blocks for s in stacks)

    def growth_sizes(self) -> list[int]:
        """Stacks trained in each stage of a progressive run: 1, 2, … K (or 1, 2, 4 … K)."""
        n = len(self.model.resolved_stacks())
        if self.training.growth.schedule == "per_stack":
            return list(range(1, n + 1))
        sizes = [1]
        while sizes[-1] < n:
            sizes.append(sizes[-1] * 2)
        return sizes

    @model_validator(mode="after")
    def _budget_covers_stages(self) -> StackWiseConfig:
        training = self.training
        budget = training.budget
        stages = self.stage_count()
        if stages == 0:
            return self  # every stack declared frozen: reported when the stages are planned
        per_step = training.batch_size * training.grad_accum_steps * training.seq_len
        steps = budget.steps
        field = "training.budget.steps"
        if budget.tokens is not None:
            steps, field = max(1, round(budget.tokens / per_step)), "training.budget.tokens"
        if steps is not None and steps < stages:
            raise ValueError(
                f"{field}: the budget gives {steps} optimizer step(s), fewer than the "
                f"{stages} stages of this {training.training_architecture} run (each stage needs "
                f"at least one); raise the budget"
            )
        return self

    @model_validator(mode="after")
    def _out_of_core_needs_a_cached_trunk(self) -> StackWiseConfig:
        training = self.training
        if not training.out_of_core:
            return self
        mode = training.mode_label
        why = None
        if not training.is_depthwise:
            why = f"{mode} training needs the whole rack in memory; use stackwise or blockwise"
        elif training.depthwise.data != "pool":
            why = "depthwise.data: fresh re-runs the whole frozen trunk every step; use pool"
        elif not training.cache.enabled:
            why = "without the activation cache the whole frozen trunk runs every step"
        elif training.fusion.enabled:
            why = "the fusion phase trains the whole rack at once"
        if why is not None:
            raise ValueError(f"training.out_of_core: {why}")
        return self

    @model_validator(mode="after")
    def _fusion_share_needs_flops(self) -> StackWiseConfig:
        fusion = self.training.fusion
        if (
            fusion.enabled
            and fusion.flops_fraction is not None
            and self.training.budget.flops is None
        ):
            raise ValueError(
                "training.fusion.flops_fraction: a share of the FLOPs budget needs "
                "training.budget.flops; give fusion steps or tokens instead"
            )
        return self

    @model_validator(mode="after")
    def _progressive_settings(self) -> StackWiseConfig:
        training = self.training
        if training.training_architecture != "progressive":
            return self
        growth = training.growth
        stacks = self.model.resolved_stacks()
        where = "model.stacks" if self.model.stacks is not None else "model.architecture"
        if training.fusion.enabled:
            raise ValueError(
                "training.fusion.enabled: a progressive run's last stage already trains the "
                "whole rack; turn fusion off"
            )
        frozen = [i for i, s in enumerate(stacks) if s.freeze_blocks]
        if frozen:
            raise ValueError(
                f"model.stacks.{frozen[0]}.freeze_blocks: a progressive run trains every stack; "
                f"declared frozen stacks are for depth-wise and rackwise runs"
            )
        n = len(stacks)
        if growth.schedule == "doubling":
            if n & (n - 1):
                allowed = ", ".join(str(2**i) for i in range(6))
                raise ValueError(
                    f"training.growth.schedule: doubling needs a power-of-two number of stacks "
                    f"({allowed} …), this rack has {n} ({where}); use schedule: per_stack"
                )
            if growth.init == "copy_middle":
                raise ValueError(
                    "training.growth.init: copy_middle inserts one stack at a time; with "
                    "schedule: doubling use copy_last (the trunk copied on top of itself) or random"
                )
        if growth.init != "random":
            first = self._stack_shape(stacks[0])
            for index, stack in enumerate(stacks[1:], start=1):
                differ = [k for k, v in self._stack_shape(stack).items() if first[k] != v]
                if stack.n_blocks != stacks[0].n_blocks:
                    differ.insert(0, "n_blocks")
                if differ:
                    raise ValueError(
                        f"training.growth.init: {growth.init} starts new stacks as copies, but "
                        f"model.stacks.{index} differs from model.stacks.0 in "
                        f"{', '.join(differ)}; give the stacks one shape or use init: random"
                    )
        return self

    def _stack_shape(self, stack: StackConfig) -> dict[str, Any]:
        """What must match for one stack's weights to be copied into another."""
        keys = ("attention_type", "attention_mode", "n_heads", "n_kv_heads", "d_ff")
        values = {k: getattr(stack, k) or getattr(self.model, k) for k in keys}
        values["freeze_up_proj"] = (
            self.model.freeze_up_proj if stack.freeze_up_proj is None else stack.freeze_up_proj
        )
        return values

    @model_validator(mode="after")
    def _copy_previous_shapes(self) -> StackWiseConfig:
        training = self.training
        mode = training.training_architecture
        if not training.is_depthwise or training.depthwise.init != "copy_previous":
            return self
        stacks = self.model.resolved_stacks()
        shape = self._stack_shape

        trained = [(i, s) for i, s in enumerate(stacks) if not s.freeze_blocks]
        for (i, previous), (j, stack) in itertools.pairwise(trained):
            differ = [k for k, v in shape(stack).items() if shape(previous)[k] != v]
            if mode == "stackwise" and previous.n_blocks != stack.n_blocks:
                differ.insert(0, "n_blocks")
            if differ:
                raise ValueError(
                    f"training.depthwise.init: copy_previous starts model.stacks.{j} as a copy "
                    f"of the piece before it (model.stacks.{i}), but they differ in "
                    f"{', '.join(differ)}; give the stacks the same shape or use init: random"
                )
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackWiseConfig:
        return cls.model_validate(data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> StackWiseConfig:
        """Load and validate a config file.

        Safe YAML; duplicate and unknown keys are errors. Raises
        `stackwise.config.errors.ConfigError` naming the file, line and dotted field.
        """
        return load_validated(path, cls)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; also written to `path` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def identity_dict(self) -> dict[str, Any]:
        """The settings that can change what a run computes: the config without
        `NOT_IDENTITY` (where it is recorded, checkpoint and log cadence, where the activation
        cache lives)."""
        payload = self.to_dict()
        for path in NOT_IDENTITY:
            section = payload
            for key in path[:-1]:
                section = section.get(key, {})
            section.pop(path[-1], None)
        if not self.training.is_depthwise:
            # Depth-wise settings change nothing in other runs, growth settings nothing
            # outside progressive runs.
            payload["training"].pop("depthwise", None)
        if self.training.training_architecture != "progressive":
            payload["training"].pop("growth", None)
        if not self.model.uses_favor:
            # How FAVOR+ draws its features changes nothing without FAVOR+ attention.
            payload["model"]["kernel"].pop("favor_sampling", None)
        return payload

    def config_hash(self) -> str:
        """Identity of the config: sha256 of the canonical JSON of `identity_dict`.

        Needs no data access. A tracked run's identity adds what the config only names: the
        content of its data files and the device type and precision it resolves to
        (`stackwise.identity.run_identity`).
        """
        canonical = json.dumps(self.identity_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
