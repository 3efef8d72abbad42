"""Self-attention modules of a StackWise Block: MHA/GQA, MLA and kernel (linear) attention.

Every module maps hidden states ``x [B, T, D]`` to ``[B, T, D]``, takes an optional padding mask
``attention_mask [B, T]`` (1 = token, 0 = padding), works in ``"causal"`` or ``"bidirectional"``
mode, and applies rotary position embeddings (RoPE) itself from positions ``0..T-1``, so a Block
never needs positions from outside.

- `GroupedQueryAttention` (attention_type ``mha`` and ``gqa``; `grouped`): ``n_kv_heads``
  key/value heads shared by groups of query heads (``n_kv_heads == n_heads`` is plain
  multi-head attention), computed by ``F.scaled_dot_product_attention``.
- `MultiHeadLatentAttention` (``mla``, DeepSeek-V2; `latent`): K and V are rebuilt from one
  shared compressed latent; RoPE lives in a separate key part shared by all heads.
  ``forward_absorbed`` is the inference form that attends in latent space with the
  up-projections folded in.
- `KernelAttention` (``kernel``; `kernel`): linear attention
  ``φ(q)ᵀ Σ φ(k) vᵀ / φ(q)ᵀ Σ φ(k)`` with a positive feature map (elu+1 or FAVOR+), RoPE applied
  to the features in the numerator only; cost is linear in T and no T×T matrix is built.
  `redraw_kernel_features` redraws FAVOR+ projections during training.

What they share (modes, `RotaryEmbedding`, `build_attention_mask`) is in `common`.

Causal attention also runs incrementally for generation (`forward_cached`): the hidden states of
the next tokens go in, with a per-module cache of everything before them (`new_cache`), and the
cache is extended in place. MHA/GQA cache their rotated keys and values (`KVCache`), MLA caches
its normed latent and rotated RoPE key and attends in the absorbed form (`LatentCache`), kernel
attention keeps its running sums (`KernelState`); the caches are in `cache`. The training
`forward` is untouched by this.
"""

from stackwise.model.attention.cache import KernelState, KVCache, LatentCache, SequenceBuffer
from stackwise.model.attention.common import (
    ATTENTION_MODES,
    FAVOR_SAMPLINGS,
    AttentionMode,
    FavorSampling,
    RotaryEmbedding,
    apply_rotary,
    build_attention_mask,
)
from stackwise.model.attention.grouped import GroupedQueryAttention
from stackwise.model.attention.kernel import (
    KernelAttention,
    default_n_features,
    redraw_kernel_features,
)
from stackwise.model.attention.latent import MultiHeadLatentAttention

__all__ = [
    "ATTENTION_MODES",
    "FAVOR_SAMPLINGS",
    "AttentionMode",
    "FavorSampling",
    "GroupedQueryAttention",
    "KVCache",
    "KernelAttention",
    "KernelState",
    "LatentCache",
    "MultiHeadLatentAttention",
    "RotaryEmbedding",
    "SequenceBuffer",
    "apply_rotary",
    "build_attention_mask",
    "default_n_features",
    "redraw_kernel_features",
]
