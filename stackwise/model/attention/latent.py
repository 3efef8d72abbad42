"""Multi-head latent attention (MLA, DeepSeek-V2): K and V rebuilt from one shared latent,
with a training form, an absorbed inference form and a cached generation form."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stackwise.model.attention.cache import LatentCache, _cached_sdpa, _check_causal_cache
from stackwise.model.attention.common import (
    AttentionMode,
    RotaryEmbedding,
    _check_mode,
    build_attention_mask,
)
from stackwise.model.norm import RMSNorm


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, section 2.1).

    - K/V: ``x -> kv_down -> [latent c (kv_lora_rank) | k_rope (rope_dim)]``; ``c`` is RMS-normed
      and expanded by ``kv_up`` to per-head ``k_nope`` and ``v``. Only ``c`` and ``k_rope`` would
      need caching at inference.
    - Q: ``x -> q_proj`` or, with ``q_lora_rank``, ``x -> q_down -> RMSNorm -> q_up``; per head
      ``[q_nope (head_dim) | q_rope (rope_dim)]``.
    - RoPE rotates only ``q_rope`` and the single ``k_rope`` shared by every head (the
      "decoupled" key), so the up-projections can be absorbed (see `forward_absorbed`).
    - scores use scale ``1/sqrt(head_dim + rope_dim)``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        kv_lora_rank: int,
        q_lora_rank: int | None = None,
        qk_rope_head_dim: int = 8,
        attention_mode: AttentionMode = "bidirectional",
        dropout: float = 0.0,
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        _check_mode(attention_mode)
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {qk_rope_head_dim}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads  # width of q_nope, k_nope and v per head
        self.rope_dim = qk_rope_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.causal = attention_mode == "causal"
        self.dropout = dropout
        self.scale = 1.0 / math.sqrt(self.head_dim + self.rope_dim)
        q_width = n_heads * (self.head_dim + self.rope_dim)
        self.q_down: nn.Linear | None = None
        self.q_norm: RMSNorm | None = None
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, q_width, bias=False)
        else:
            self.q_down = nn.Linear(d_model, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, eps=norm_eps)
            self.q_proj = nn.Linear(q_lora_rank, q_width, bias=False)  # the "q_up" projection
        self.kv_down = nn.Linear(d_model, kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, eps=norm_eps)
        self.kv_up = nn.Linear(kv_lora_rank, n_heads * 2 * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.rope_dim, rope_theta) if use_rope else None

    def _queries(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head ``q_nope [B,H,T,head_dim]`` and rotated ``q_rope [B,H,T,rope_dim]`` (the
        tokens at positions ``start..start+T-1``)."""
        batch, seq_len, _ = x.shape
        if self.q_down is not None and self.q_norm is not None:
            x = self.q_norm(self.q_down(x))
        q = self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim + self.rope_dim)
        q_nope, q_rope = q.transpose(1, 2).split((self.head_dim, self.rope_dim), dim=-1)
        if self.rotary is not None:
            q_rope = self.rotary(q_rope, start)
        return q_nope, q_rope

    def _latent(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed shared latent ``c [B,T,r]`` and rotated shared key ``k_rope [B,1,T,rope_dim]``."""
        latent, k_rope = self.kv_down(x).split((self.kv_lora_rank, self.rope_dim), dim=-1)
        k_rope = k_rope.unsqueeze(1)
        if self.rotary is not None:
            k_rope = self.rotary(k_rope, start)
        return self.kv_norm(latent), k_rope

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        mask = None
        if attention_mask is not None:
            mask = build_attention_mask(attention_mask, self.causal, q.shape[-2])
        value_width = v.shape[-1]
        if q.device.type == "cpu" and value_width < q.shape[-1]:
            # The CPU flash kernel needs values as wide as queries and keys; otherwise SDPA falls
            # back to the math path, which builds the T x T matrix (memory quadratic in T). Zero
            # value channels add zero output channels, cut off below.
            v = F.pad(v, (0, q.shape[-1] - value_width))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and mask is None,
            scale=self.scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out[..., :value_width]

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Training form: rebuild per-head K and V from the latent, then standard attention."""
        batch, seq_len, _ = x.shape
        q_nope, q_rope = self._queries(x)
        latent, k_rope = self._latent(x)
        kv = self.kv_up(latent).view(batch, seq_len, self.n_heads, 2 * self.head_dim)
        k_nope, v = kv.transpose(1, 2).split((self.head_dim, self.head_dim), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, self.n_heads, -1, -1)), dim=-1)
        out = self._attend(q, k, v, attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))

    def forward_absorbed(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Inference form, equal to `forward`: attention runs in the latent space.

        ``q_nopeᵀ k_nope = q_nopeᵀ W_uk c = (W_ukᵀ q_nope)ᵀ c`` and ``Σ p v = W_uv Σ p c``: the
        key up-projection is folded into the query and the value up-projection is applied after
        attention. Every head then attends to the same single K/V "head" ``[c | k_rope]``, which
        is what makes MLA's KV cache small.
        """
        batch, seq_len, _ = x.shape
        q_nope, q_rope = self._queries(x)
        latent, k_rope = self._latent(x)
        w_kv = self.kv_up.weight.view(self.n_heads, 2 * self.head_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv.split((self.head_dim, self.head_dim), dim=1)  # [H, head_dim, r] each
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        q = torch.cat((q_latent, q_rope), dim=-1)  # [B, H, T, r + rope_dim]
        k = torch.cat((latent.unsqueeze(1), k_rope), dim=-1)  # [B, 1, T, r + rope_dim]
        out_latent = self._attend(q, k, latent.unsqueeze(1), attention_mask)  # [B, H, T, r]
        out = torch.einsum("bhtr,hdr->bthd", out_latent, w_uv).reshape(batch, seq_len, -1)
        return self.o_proj(out)

    def new_cache(self) -> LatentCache:
        return LatentCache()

    def forward_cached(self, x: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """`forward_absorbed` for the next tokens ``x [B, T_new, D]`` after the cached ones
        (causal mode, no padding): only ``[c | k_rope]`` per token is cached and every head
        attends to it, with ``W_uk`` folded into the queries and ``W_uv`` applied after."""
        _check_causal_cache(self.causal)
        batch, new, _ = x.shape
        start = cache.length
        q_nope, q_rope = self._queries(x, start)
        latent, k_rope = self._latent(x, start)
        keys = cache.keys.append(torch.cat((latent.unsqueeze(1), k_rope), dim=-1))
        w_kv = self.kv_up.weight.view(self.n_heads, 2 * self.head_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv.split((self.head_dim, self.head_dim), dim=1)
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        q = torch.cat((q_latent, q_rope), dim=-1)
        out_latent = _cached_sdpa(q, keys, keys[..., : self.kv_lora_rank], start, self.scale)
        out = torch.einsum("bhtr,hdr->bthd", out_latent, w_uv).reshape(batch, new, -1)
        return self.o_proj(out)

    def attention_flops_per_token(self, n_ctx: int) -> int:
        """Forward FLOPs of QKᵀ and AV per token in the training form."""
        return 2 * self.n_heads * (2 * self.head_dim + self.rope_dim) * n_ctx
