"""Grouped-query attention: MHA (``n_kv_heads == n_heads``), GQA and multi-query attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stackwise.model.attention.cache import KVCache, _cached_sdpa, _check_causal_cache
from stackwise.model.attention.common import (
    AttentionMode,
    RotaryEmbedding,
    _check_mode,
    _head_layout,
    apply_rotary,
    build_attention_mask,
)


class GroupedQueryAttention(nn.Module):
    """Multi-head attention with ``n_kv_heads`` K/V heads shared by groups of query heads.

    ``n_kv_heads == n_heads`` is standard MHA, ``n_kv_heads == 1`` multi-query attention.
    Q, K and V come from one fused projection; RoPE rotates every head of Q and K;
    ``F.scaled_dot_product_attention`` does the rest (``enable_gqa`` shares K/V heads without
    copying them). Without a padding mask, causal mode uses ``is_causal=True`` so the fused
    kernels apply; with one, a boolean mask combines causality and key padding.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        attention_mode: AttentionMode = "bidirectional",
        dropout: float = 0.0,
        use_rope: bool = True,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        _check_mode(attention_mode)
        n_kv_heads, self.head_dim = _head_layout(d_model, n_heads, n_kv_heads)
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.causal = attention_mode == "causal"
        self.dropout = dropout
        self.qkv_proj = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, rope_theta) if use_rope else None

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        n_q, n_kv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(batch, seq_len, n_q + 2 * n_kv, self.head_dim)
        qk, v = qkv.split((n_q + n_kv, n_kv), dim=2)
        if self.rotary is not None:  # one pass over the query and key heads together
            rotation = self.rotary.rotation(seq_len, x.device, x.dtype)
            qk = apply_rotary(qk, rotation[:, None])
        q, k = qk.transpose(1, 2).split((n_q, n_kv), dim=1)  # [B, heads, T, head_dim]
        v = v.transpose(1, 2)
        mask = None
        if attention_mask is not None:
            mask = build_attention_mask(attention_mask, self.causal, seq_len)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        out = out.transpose(1, 2).reshape(batch, seq_len, n_q * self.head_dim)
        return self.o_proj(out)

    def new_cache(self) -> KVCache:
        return KVCache()

    def forward_cached(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Outputs for the next tokens ``x [B, T_new, D]`` after the ``cache.length`` cached
        ones (causal mode, no padding); their keys and values are appended to `cache`."""
        _check_causal_cache(self.causal)
        batch, new, _ = x.shape
        start, n_q, n_kv = cache.length, self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(batch, new, n_q + 2 * n_kv, self.head_dim)
        qk, v = qkv.split((n_q + n_kv, n_kv), dim=2)
        if self.rotary is not None:
            rotation = self.rotary.rotation(start + new, x.device, x.dtype)[start:]
            qk = apply_rotary(qk, rotation[:, None])
        q, k = qk.transpose(1, 2).split((n_q, n_kv), dim=1)
        keys = cache.keys.append(k)
        values = cache.values.append(v.transpose(1, 2))
        out = _cached_sdpa(q, keys, values, start)
        return self.o_proj(out.transpose(1, 2).reshape(batch, new, n_q * self.head_dim))

    def attention_flops_per_token(self, n_ctx: int) -> int:
        """Forward FLOPs of QKᵀ and AV per token (full context; no causal halving)."""
        return 4 * self.n_heads * self.head_dim * n_ctx
