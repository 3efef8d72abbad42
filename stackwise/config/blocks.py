"""Block specifications, resolved once: every setting of one block with its defaults filled in.

A `BlockSpec` is what `stackwise.model.architecture.Block` is built from, what the memory
estimate and the parameter count read, and what a saved rack records (as a plain dict,
`BlockSpec.as_dict`). The defaults derived from ``d_model`` live here, free of torch:

- ``n_heads``: `default_n_heads` (head width 64, even);
- ``d_ff``: `default_d_ff` (SwiGLU, 8/3 · d_model rounded up);
- ``n_kv_heads``: ``n_heads`` (mha/gqa/kernel; mla has none);
- mla's ``kv_lora_rank``: ``d_model // 4``; ``qk_rope_head_dim``: `default_rope_head_dim`.

`ModelConfig.block_specs` (in `stackwise.config.model`) applies each stack's overrides to the
model's settings and resolves one spec per stack: the only place where ``stack.x`` falls back to
``model.x``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

AttentionType = Literal["mha", "gqa", "mla", "kernel"]
AttentionMode = Literal["bidirectional", "causal"]
FeatureMap = Literal["elu", "favor"]
FavorSampling = Literal["orthogonal", "antithetic", "regularized"]
ATTENTION_TYPES: tuple[str, ...] = get_args(AttentionType)
ATTENTION_MODES: tuple[str, ...] = get_args(AttentionMode)
FAVOR_SAMPLINGS: tuple[str, ...] = get_args(FavorSampling)

#: Per-stack settings that override the model's (`BlockOverrides` fields).
OVERRIDABLE = (
    "attention_type",
    "attention_mode",
    "n_heads",
    "n_kv_heads",
    "d_ff",
    "dropout",
    "freeze_up_proj",
)


def default_n_heads(d_model: int) -> int:
    """``max(1, d_model // 64)`` heads (head width 64), lowered until it divides d_model with an
    even head width (RoPE rotates channel pairs)."""
    n_heads = max(1, d_model // 64)
    while n_heads > 1 and (d_model % n_heads or (d_model // n_heads) % 2):
        n_heads -= 1
    return n_heads


def default_d_ff(d_model: int) -> int:
    """SwiGLU hidden width: ``8/3 * d_model`` (same parameters as a 4x GELU FFN), rounded up to a
    multiple of 256 when d_model >= 1024 (Llama: 4096 -> 11008) and of 8 below (512 -> 1368)."""
    multiple = 256 if d_model >= 1024 else 8
    return multiple * math.ceil(8 * d_model / 3 / multiple)


def default_rope_head_dim(head_dim: int) -> int:
    """MLA's decoupled RoPE width: half the head width, rounded down to even, at least 2."""
    return max(2, (head_dim // 2) // 2 * 2)


@dataclass(frozen=True)
class BlockSpec:
    """Every setting of one block, validated, with the defaults resolved (see the module)."""

    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int | None  # None for mla (one shared latent)
    attention_type: AttentionType = "mha"
    attention_mode: AttentionMode = "bidirectional"
    dropout: float = 0.0
    freeze_up_proj: bool = False
    use_rope: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    kernel_feature_map: FeatureMap = "elu"
    kernel_n_features: int | None = None
    kernel_chunk_size: int = 64
    kernel_seed: int = 0
    kernel_redraw_every: int | None = None
    kernel_favor_sampling: FavorSampling = "regularized"

    @classmethod
    def resolve(
        cls,
        d_model: int,
        d_ff: int | None = None,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        **options: Any,
    ) -> BlockSpec:
        """The spec of a block of width `d_model`: unset sizes get their defaults, and the
        combination is checked (ValueError naming the setting). `options` are the other fields.

        ``mha`` and ``gqa`` are one implementation, so ``mha`` with fewer K/V heads is
        grouped-query attention (the type is a label); ``kernel`` shares K/V heads the same way;
        ``mla`` has no K/V heads, so ``n_kv_heads`` must be None there. Options of other
        attention types are kept but unused.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown block settings {unknown}; known: {sorted(known)}")
        attention_type = options.get("attention_type", "mha")
        attention_mode = options.get("attention_mode", "bidirectional")
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(
                f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}"
            )
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(
                f"attention_mode must be one of {ATTENTION_MODES}, got {attention_mode!r}"
            )
        n_heads = default_n_heads(d_model) if n_heads is None else n_heads
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        head_dim = d_model // n_heads
        use_rope = options.get("use_rope", True)
        if attention_type == "mla":
            if n_kv_heads is not None:
                raise ValueError(
                    "attention_type 'mla' shares one latent; n_kv_heads does not apply"
                )
            if options.get("kv_lora_rank") is None:
                options["kv_lora_rank"] = max(1, d_model // 4)
            if options.get("qk_rope_head_dim") is None:
                options["qk_rope_head_dim"] = default_rope_head_dim(head_dim)
        else:
            n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads is not None and n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        if use_rope and attention_type != "mla" and head_dim % 2:
            raise ValueError(f"RoPE needs an even head width; d_model/n_heads = {head_dim}")
        if attention_type == "kernel":
            redraw = options.get("kernel_redraw_every")
            if redraw is not None and redraw < 1:
                raise ValueError(f"kernel_redraw_every must be at least 1, got {redraw}")
            sampling = options.get("kernel_favor_sampling", "regularized")
            if sampling not in FAVOR_SAMPLINGS:
                raise ValueError(
                    f"kernel_favor_sampling must be one of {FAVOR_SAMPLINGS}, got {sampling!r}"
                )
            features = options.get("kernel_n_features")
            odd = features is not None and features % 2 == 1
            if use_rope and options.get("kernel_feature_map", "elu") == "favor" and odd:
                raise ValueError(
                    f"RoPE rotates kernel features in pairs; kernel_n_features must be even, "
                    f"got {features}"
                )
        return cls(
            d_model=d_model,
            d_ff=default_d_ff(d_model) if d_ff is None else d_ff,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            **options,
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def as_dict(self) -> dict[str, Any]:
        """`Block` keyword arguments (the form a saved rack's ``rack_spec.json`` holds)."""
        return asdict(self)
