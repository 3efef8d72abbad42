"""The `training` section: how a Rack is trained (mode, objective, optimizer, budget, stages,
depth-wise options, cache, checkpoints, growth)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from stackwise.config.section import BaseConfig

TrainingArchitecture = Literal["rackwise", "stackwise", "blockwise", "progressive"]
# Modes with a frozen, cached trunk under the piece being trained.
DEPTHWISE_MODES = ("stackwise", "blockwise")
Objective = Literal["clm", "mlm", "diffusion"]
Precision = Literal["fp32", "bf16", "fp16"]
# Frozen pieces may also be held as int8 weights (weight-only quantization).
FrozenPrecision = Literal["fp32", "bf16", "fp16", "int8"]


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
        "int8 (weight-only quantization of their linear layers, a quarter of fp32's bytes). "
        "It matters where the trunk is re-run (depthwise.data: fresh, or "
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

    @model_validator(mode="after")
    def _mask_range(self) -> TrainingConfig:
        if self.mask_ratio_min >= self.mask_ratio_max:
            raise ValueError(
                f"mask_ratio_min: mask_ratio_min ({self.mask_ratio_min}) must be less than "
                f"mask_ratio_max ({self.mask_ratio_max})"
            )
        return self
