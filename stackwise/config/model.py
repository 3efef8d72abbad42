"""The `model` section: dimensions, attention, and how blocks group into stacks."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from stackwise.config.blocks import (
    OVERRIDABLE,
    AttentionMode,
    AttentionType,
    BlockSpec,
    FavorSampling,
    FeatureMap,
)
from stackwise.config.section import BaseConfig

# Size of the built-in byte-level tokenizer: 256 byte values + [PAD], [MASK], [BOS], [EOS].
BYTE_VOCAB_SIZE = 260


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

    feature_map: FeatureMap = Field(
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
    favor_sampling: FavorSampling = Field(
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
            self.stack_settings(stack)["attention_type"] == "kernel"
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

    def stack_settings(self, stack: BlockOverrides) -> dict[str, Any]:
        """The overridable block settings of `stack` (`OVERRIDABLE`): its own where set, else the
        model's. The one place where a stack setting falls back to the model's."""
        settings = {}
        for key in OVERRIDABLE:
            own = getattr(stack, key)
            settings[key] = getattr(self, key) if own is None else own
        return settings

    def block_spec(self, stack: BlockOverrides) -> BlockSpec:
        """The resolved spec of every block of `stack` (ValueError when it does not resolve)."""
        settings = self.stack_settings(stack)
        if settings["attention_type"] == "mla":
            settings["n_kv_heads"] = None  # one shared latent: K/V heads do not apply
        return BlockSpec.resolve(
            d_model=self.d_model,
            use_rope=self.use_rope,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            kv_lora_rank=self.mla.kv_lora_rank,
            q_lora_rank=self.mla.q_lora_rank,
            qk_rope_head_dim=self.mla.rope_head_dim,
            kernel_feature_map=self.kernel.feature_map,
            kernel_n_features=self.kernel.n_features,
            kernel_chunk_size=self.kernel.chunk_size,
            kernel_seed=self.kernel.seed,
            kernel_redraw_every=self.kernel.redraw_every,
            kernel_favor_sampling=self.kernel.favor_sampling,
            **settings,
        )

    def block_specs(self) -> list[BlockSpec]:
        """One resolved block spec per stack, in the order of `resolved_stacks`."""
        return [self.block_spec(stack) for stack in self.resolved_stacks()]

    @model_validator(mode="after")
    def _check_dimensions(self) -> ModelConfig:
        for index, stack in enumerate(self.resolved_stacks()):
            where = f"stacks.{index}." if self.stacks is not None else ""
            settings = self.stack_settings(stack)
            n_heads = settings["n_heads"]
            n_kv_heads = settings["n_kv_heads"] or n_heads
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
            attention = settings["attention_type"]
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
