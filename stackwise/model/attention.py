"""Self-attention modules of a StackWise Block: MHA/GQA, MLA and kernel (linear) attention.

Every module maps hidden states ``x [B, T, D]`` to ``[B, T, D]``, takes an optional padding mask
``attention_mask [B, T]`` (1 = token, 0 = padding), works in ``"causal"`` or ``"bidirectional"``
mode, and applies rotary position embeddings (RoPE) itself from positions ``0..T-1``, so a Block
never needs positions from outside.

- `GroupedQueryAttention` (attention_type ``mha`` and ``gqa``): ``n_kv_heads`` key/value heads
  shared by groups of query heads (``n_kv_heads == n_heads`` is plain multi-head attention),
  computed by ``F.scaled_dot_product_attention``.
- `MultiHeadLatentAttention` (``mla``, DeepSeek-V2): K and V are rebuilt from one shared
  compressed latent; RoPE lives in a separate key part shared by all heads. ``forward_absorbed``
  is the inference form that attends in latent space with the up-projections folded in.
- `KernelAttention` (``kernel``): linear attention ``φ(q)ᵀ Σ φ(k) vᵀ / φ(q)ᵀ Σ φ(k)`` with a
  positive feature map (elu+1 or FAVOR+), RoPE applied to the features in the numerator only;
  cost is linear in T and no T×T matrix is built. `redraw_kernel_features` redraws FAVOR+
  projections during training.

Causal attention also runs incrementally for generation (`forward_cached`): the hidden states of
the next tokens go in, with a per-module cache of everything before them (`new_cache`), and the
cache is extended in place. MHA/GQA cache their rotated keys and values (`KVCache`), MLA caches
its normed latent and rotated RoPE key and attends in the absorbed form (`LatentCache`), kernel
attention keeps its running sums (`KernelState`). The training `forward` is untouched by this.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from stackwise.model.norm import RMSNorm

AttentionMode = Literal["bidirectional", "causal"]
ATTENTION_MODES = ("bidirectional", "causal")
# How FAVOR+ draws its random projection (see `_orthogonal_random_features`).
FavorSampling = Literal["orthogonal", "antithetic", "regularized"]
FAVOR_SAMPLINGS = ("orthogonal", "antithetic", "regularized")


# --------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021) of width ``dim`` for positions ``0..T-1``.

    Channel pairs ``(2i, 2i+1)`` are read as one complex number and rotated by the angle
    ``position * theta^(-2i/dim)``: a single complex multiply, forward and backward, which is
    cheaper than the "rotate half" formulation's five element-wise passes. The rotation table
    (cos, sin) is cached per (device, precision) and grown on demand; it is not part of the
    state_dict because it is a pure function of ``dim`` and ``theta``.
    """

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE needs an even dimension, got {dim}")
        self.dim = dim
        self.theta = theta
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def rotation(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[seq_len, dim/2, 2]``: (cos, sin) of each position's angle for each channel pair,
        in float64 for float64 inputs and float32 otherwise."""
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (device, table_dtype)
        cached = self._cache.get(key)
        if cached is None or cached.shape[0] < seq_len:
            length = max(seq_len, 2 * cached.shape[0] if cached is not None else 0)
            # Angles in float64 on the CPU so long positions stay exact, then cast once.
            exponents = torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim
            angles = torch.outer(torch.arange(length, dtype=torch.float64), self.theta**-exponents)
            cached = torch.stack((angles.cos(), angles.sin()), dim=-1).to(device, table_dtype)
            self._cache[key] = cached
        return cached[:seq_len]

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate ``x [..., T, dim]`` by its position along the second-to-last axis, counted
        from ``start``."""
        return apply_rotary(x, self.rotation(start + x.shape[-2], x.device, x.dtype)[start:])


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of ``x [..., dim]`` by ``rotation`` ((cos, sin) pairs,
    broadcastable to ``[..., dim/2, 2]``). Half-precision inputs are rotated in float32."""
    pairs = x.to(torch.promote_types(x.dtype, torch.float32))
    strides = pairs.stride()
    if pairs.storage_offset() % 2 or strides[-1] != 1 or any(s % 2 for s in strides[:-1]):
        # A slice at an odd channel offset or with an odd row stride (MLA's RoPE part after an
        # odd kv_lora_rank or head width) cannot be viewed as complex pairs in place. A copy,
        # not `contiguous()`: a slice with only size-1 outer dims (one token of one sequence)
        # counts as contiguous and would keep its odd offset.
        pairs = pairs.clone(memory_format=torch.contiguous_format)
    pairs = pairs.unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        # Inductor generates no code for complex numbers; this real form fuses instead.
        real, imag = pairs.unbind(-1)
        cos, sin = rotation.unbind(-1)
        rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rotation))
    return rotated.flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Masks shared by the softmax attentions
# --------------------------------------------------------------------------------------------


def build_attention_mask(attention_mask: torch.Tensor, causal: bool, seq_len: int) -> torch.Tensor:
    """Boolean SDPA mask ``[B, 1, T, T]`` (True = may attend) from a padding mask ``[B, T]``.

    Keys that are padding are hidden; in causal mode future keys are hidden too. Every query may
    always attend to itself: that never lets information flow backwards in time and keeps rows of
    padding queries (e.g. left padding) from being all-masked, which would make softmax NaN.
    Real tokens' outputs are unaffected because their own key is never padding.
    """
    device = attention_mask.device
    allowed = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    if causal:
        allowed = allowed & torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    return allowed | torch.eye(seq_len, dtype=torch.bool, device=device)


def _check_mode(attention_mode: str) -> None:
    if attention_mode not in ATTENTION_MODES:
        raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {attention_mode!r}")


def _head_layout(d_model: int, n_heads: int, n_kv_heads: int | None) -> tuple[int, int]:
    """(n_kv_heads, head_dim) of grouped heads, checking that the dimensions divide."""
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
    return n_kv_heads, d_model // n_heads


# --------------------------------------------------------------------------------------------
# Caches for incremental (generation) forwards
# --------------------------------------------------------------------------------------------


class SequenceBuffer:
    """A tensor that grows along its second-to-last (sequence) axis.

    Appending writes into preallocated room whose capacity doubles when full, so a generation
    of N tokens copies O(N) elements in all rather than the O(N²) of concatenating every step.
    """

    def __init__(self) -> None:
        self._data: torch.Tensor | None = None
        self.length = 0

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Append ``x [..., T_new, D]``; returns a view of everything so far ``[..., T, D]``."""
        new_length = self.length + x.shape[-2]
        if self._data is None or self._data.shape[-2] < new_length:
            capacity = max(new_length, 2 * (0 if self._data is None else self._data.shape[-2]), 16)
            grown = x.new_empty((*x.shape[:-2], capacity, x.shape[-1]))
            if self._data is not None:
                grown[..., : self.length, :] = self._data[..., : self.length, :]
            self._data = grown
        self._data[..., self.length : new_length, :] = x
        self.length = new_length
        return self._data[..., :new_length, :]


class KVCache:
    """MHA/GQA cache: rotated keys and values ``[B, n_kv_heads, T, head_dim]``."""

    def __init__(self) -> None:
        self.keys = SequenceBuffer()
        self.values = SequenceBuffer()

    @property
    def length(self) -> int:
        return self.keys.length


class LatentCache:
    """MLA cache: per token the normed latent and the rotated shared RoPE key, stored side by
    side as one key row ``[c | k_rope]`` ``[B, 1, T, kv_lora_rank + rope_dim]``; the values
    are its first ``kv_lora_rank`` channels (the absorbed form attends to the latent itself)."""

    def __init__(self) -> None:
        self.keys = SequenceBuffer()

    @property
    def length(self) -> int:
        return self.keys.length


class KernelState:
    """Kernel attention's running sums over the tokens seen so far.

    ``numerator`` is ``Σ_s R_s φ(k_s) v_sᵀ`` ``[B, kv, 1, F, head_dim]`` and ``normaliser``
    ``Σ_s φ(k_s)`` ``[B, kv, 1, 1, F]``. For FAVOR+ both are stored scaled by ``exp(-shift)``,
    ``shift`` ``[B, kv, 1, 1, 1]`` being the largest key log-feature so far (the training
    forward shifts by the largest over the whole sequence; any common shift cancels).
    """

    def __init__(self) -> None:
        self.numerator: torch.Tensor | None = None
        self.normaliser: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None
        self.length = 0


def _cached_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of queries at positions ``start..start+T_new-1`` to keys ``0..T-1``."""
    new = q.shape[-2]
    mask = None
    if new > 1 and start > 0:  # query i sees keys up to start + i
        query_pos = torch.arange(start, start + new, device=q.device)[:, None]
        mask = torch.arange(k.shape[-2], device=q.device)[None, :] <= query_pos
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=new > 1 and start == 0,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )


def _check_causal_cache(causal: bool) -> None:
    if not causal:
        raise ValueError(
            "incremental forwards need causal attention: a bidirectional block's earlier "
            "outputs change with every new token"
        )


# --------------------------------------------------------------------------------------------
# MHA / GQA
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# MLA (DeepSeek-V2 multi-head latent attention)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Kernel (linear) attention
# --------------------------------------------------------------------------------------------


def default_n_features(head_dim: int) -> int:
    """FAVOR+'s default feature count: about ``head_dim · ln(head_dim)`` (Performer), rounded to
    an even number (RoPE rotates features in pairs), at least 2."""
    return max(2, 2 * round(head_dim * math.log(head_dim) / 2))


class KernelAttention(nn.Module):
    """Linear attention with a positive feature map φ (Katharopoulos et al., 2020).

    ``out_t = Σ_s (R_t φ(q_t))ᵀ (R_s φ(k_s)) v_s / Σ_s φ(q_t)ᵀ φ(k_s)`` where ``R_t`` is RoPE
    over the F feature channels at position t (RoFormer, section 3.3): the rotation is applied
    after φ and in the numerator only, so the weights depend on positions only through ``s - t``
    and the normaliser stays positive. Without RoPE both sums use plain φ. Bidirectional: the
    sums run over every real key (a state ``S = Σ R_s φ(k_s) v_sᵀ`` and ``z = Σ φ(k_s)``).
    Causal: they run over ``s <= t``, chunk by chunk — an exclusive prefix sum of per-chunk
    states plus a ``chunk × chunk`` causal product inside each chunk for the numerator, a prefix
    sum of φ(k) for the normaliser — so memory and time are linear in T and no T×T matrix is
    built. Query heads that share a K/V head share its φ(k) and states.

    Feature maps: ``"elu"`` is ``elu(x) + 1`` (F = head_dim); ``"favor"`` is FAVOR+ positive
    orthogonal random features (Choromanski et al., 2021), F = ``n_features`` (default
    `default_n_features`), for which ``φ(q)ᵀφ(k)`` estimates ``exp(qᵀk / sqrt(head_dim))``.
    As in the Performer reference, the log-features are shifted by their maximum — per row for a
    query, one constant per batch element and head for the keys (over its real keys) — which
    cancels between numerator and denominator and keeps ``exp`` in range. (In causal mode that
    constant also covers later keys: an early key whose log-features sit more than ~87 below
    the maximum, which takes very uneven key norms, underflows to 0 in fp32.) The projection
    is drawn from ``seed`` and stored as a buffer, so it is saved with the model and never
    trained; with ``redraw_every`` it is redrawn by `redraw_kernel_features`. ``sampling``
    chooses the draw (see `_orthogonal_random_features`): ``"regularized"`` (default; pairs
    ``±ω`` of norm ``sqrt(head_dim)``, the lowest error for a given F, slightly biased),
    ``"antithetic"`` (pairs ``±ω``, unbiased) or ``"orthogonal"`` (the Performer's FAVOR+,
    unbiased).

    The denominator is a sum of positive terms, accurate in any precision unless it underflows;
    it gets ``eps`` relative to its upper bound ``‖φ(q_t)‖₁ ‖z_t‖₁`` (not an absolute eps, which
    would shrink the output of a query whose features are all small), so scaling the features
    changes nothing. Padded keys (``attention_mask == 0``) get φ(k) = 0 and
    contribute nothing; a query with no real key to attend outputs 0. There is no dropout on
    attention weights here (they are never formed); the Block's residual dropout still applies.
    """

    eps = 1e-12  # relative to the denominator's upper bound

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        attention_mode: AttentionMode = "bidirectional",
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        feature_map: Literal["elu", "favor"] = "elu",
        n_features: int | None = None,
        chunk_size: int = 64,
        seed: int = 0,
        redraw_every: int | None = None,
        sampling: FavorSampling = "regularized",
    ) -> None:
        super().__init__()
        _check_mode(attention_mode)
        if feature_map not in ("elu", "favor"):
            raise ValueError(f"feature_map must be 'elu' or 'favor', got {feature_map!r}")
        if sampling not in FAVOR_SAMPLINGS:
            raise ValueError(f"sampling must be one of {FAVOR_SAMPLINGS}, got {sampling!r}")
        if redraw_every is not None and redraw_every < 1:
            raise ValueError(f"redraw_every must be at least 1, got {redraw_every}")
        n_kv_heads, self.head_dim = _head_layout(d_model, n_heads, n_kv_heads)
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.causal = attention_mode == "causal"
        self.feature_map = feature_map
        self.chunk_size = chunk_size
        self.seed = seed
        self.redraw_every = redraw_every
        self.sampling = sampling
        if feature_map == "elu":
            self.n_features = self.head_dim
        else:
            self.n_features = (
                default_n_features(self.head_dim) if n_features is None else n_features
            )
        if use_rope and self.n_features % 2:
            raise ValueError(
                f"RoPE rotates kernel features in pairs; n_features must be even, "
                f"got {self.n_features}"
            )
        self.qkv_proj = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.n_features, rope_theta) if use_rope else None
        self.projection: torch.Tensor | None
        if feature_map == "favor":
            generator = torch.Generator().manual_seed(seed)
            drawn = _orthogonal_random_features(self.n_features, self.head_dim, generator, sampling)
            self.register_buffer("projection", drawn)
        else:
            self.projection = None

    # -- feature maps ---------------------------------------------------------------------------

    def _phi(
        self, x: torch.Tensor, is_query: bool, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """φ(x) ``[..., T, F]`` of queries or keys; ``valid`` (keys only, broadcastable to
        ``[..., T, 1]``) is False at padding, whose features are 0."""
        if self.projection is None:
            phi = F.elu(x) + 1.0
            return phi if valid is None else phi.masked_fill(~valid, 0.0)
        logits = self._favor_logits(x)
        if is_query:  # one shift per row
            shift = logits.amax(dim=-1, keepdim=True)
        else:  # keys: one shift over every real key and feature of the head
            if valid is not None:  # exp(-inf) = 0, and so is its gradient
                logits = logits.masked_fill(~valid, -math.inf)
            shift = logits.amax(dim=(-2, -1), keepdim=True)
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        # The shift cancels between numerator and denominator: it carries no gradient.
        return torch.exp(logits - shift.detach()) * self.n_features**-0.5

    def _favor_logits(self, x: torch.Tensor) -> torch.Tensor:
        """FAVOR+: φ(x) = exp(wᵀx' - |x'|²/2) / sqrt(m) with x' = x / d^(1/4); this is the
        exponent ``wᵀx' - |x'|²/2``."""
        assert self.projection is not None
        x = x * self.head_dim**-0.25
        return x @ self.projection.to(x.dtype).T - 0.5 * x.pow(2).sum(-1, keepdim=True)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        seq_len = x.shape[1]
        q, k, v = self._heads(x)
        valid = None
        if attention_mask is not None:
            valid = attention_mask.bool()[:, None, None, :, None]
        phi_q, phi_k = self._phi(q, is_query=True), self._phi(k, is_query=False, valid=valid)
        rot_q, rot_k = phi_q, phi_k
        if self.rotary is not None:
            rotation = self.rotary.rotation(seq_len, x.device, phi_q.dtype)
            rot_q, rot_k = apply_rotary(phi_q, rotation), apply_rotary(phi_k, rotation)
        if self.causal:
            numerator = self._causal_numerator(rot_q, rot_k, v)
            z = torch.cumsum(phi_k, dim=-2)  # [B, kv, 1, T, F]: Σ_{s<=t} φ(k_s)
            denominator = (phi_q.unsqueeze(-2) @ z.unsqueeze(-1)).flatten(-3)  # per-t dot
            bound = phi_q.sum(-1) * z.sum(-1)
        else:
            numerator = rot_q @ (rot_k.transpose(-1, -2) @ v)
            z = phi_k.sum(dim=-2, keepdim=True)  # [B, kv, 1, 1, F]
            denominator = (phi_q @ z.transpose(-1, -2)).squeeze(-1)
            bound = phi_q.sum(-1) * z.sum(-1)
        return self._output(numerator, denominator, bound)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of ``x [B, T, D]`` as ``[B, kv heads, query heads per kv head (1 for k and
        v), T, head_dim]``."""
        batch, seq_len, _ = x.shape
        n_kv, group, head_dim = self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split(
            (self.n_heads * head_dim, n_kv * head_dim, n_kv * head_dim), dim=-1
        )
        q = q.view(batch, seq_len, n_kv, group, head_dim).permute(0, 2, 3, 1, 4)
        k = k.view(batch, seq_len, n_kv, 1, head_dim).permute(0, 2, 3, 1, 4)
        v = v.view(batch, seq_len, n_kv, 1, head_dim).permute(0, 2, 3, 1, 4)
        return q, k, v

    def _output(
        self, numerator: torch.Tensor, denominator: torch.Tensor, bound: torch.Tensor
    ) -> torch.Tensor:
        """``o_proj(numerator / (denominator + eps · bound))`` back in ``[B, T, D]``; a query
        with no real key (denominator 0) outputs 0."""
        denominator = denominator + self.eps * bound
        denominator = denominator.masked_fill(denominator == 0, 1.0)
        out = numerator / denominator.unsqueeze(-1)  # [B, kv, group, T, head_dim]
        batch, seq_len = out.shape[0], out.shape[3]
        out = out.permute(0, 3, 1, 2, 4).reshape(batch, seq_len, self.n_heads * self.head_dim)
        return self.o_proj(out)

    def new_cache(self) -> KernelState:
        return KernelState()

    def forward_cached(self, x: torch.Tensor, state: KernelState) -> torch.Tensor:
        """Outputs for the next tokens ``x [B, T_new, D]`` after the ``state.length`` seen ones
        (causal mode, no padding), from the running sums in `state`, which are then extended:
        the numerator adds ``(R_t φ(q_t))ᵀ S`` to the chunked product over the new tokens,
        the normaliser adds ``z`` to their prefix sum of φ(k). Cost per token is constant."""
        _check_causal_cache(self.causal)
        new, start = x.shape[1], state.length
        q, k, v = self._heads(x)
        phi_q = self._phi(q, is_query=True)
        phi_k = self._running_key_features(k, state)
        rot_q, rot_k = phi_q, phi_k
        if self.rotary is not None:
            rotation = self.rotary.rotation(start + new, x.device, phi_q.dtype)[start:]
            rot_q, rot_k = apply_rotary(phi_q, rotation), apply_rotary(phi_k, rotation)
        numerator = self._causal_numerator(rot_q, rot_k, v)
        z = torch.cumsum(phi_k, dim=-2)
        if state.numerator is not None and state.normaliser is not None:
            numerator = numerator + rot_q @ state.numerator
            z = z + state.normaliser
        denominator = (phi_q.unsqueeze(-2) @ z.unsqueeze(-1)).flatten(-3)
        block_state = rot_k.transpose(-1, -2) @ v  # [B, kv, 1, F, head_dim]
        state.numerator = block_state if state.numerator is None else state.numerator + block_state
        state.normaliser = z[..., -1:, :]
        state.length = start + new
        return self._output(numerator, denominator, phi_q.sum(-1) * z.sum(-1))

    def _running_key_features(self, k: torch.Tensor, state: KernelState) -> torch.Tensor:
        """φ(k) of new keys; for FAVOR+ shifted by the largest key log-feature seen so far,
        rescaling the sums in `state` when a new key raises it (as an online softmax does)."""
        if self.projection is None:
            return self._phi(k, is_query=False)
        logits = self._favor_logits(k)
        shift = logits.amax(dim=(-2, -1), keepdim=True)
        if state.shift is not None:
            shift = torch.maximum(shift, state.shift)
            rescale = torch.exp(state.shift - shift)
            if state.numerator is not None and state.normaliser is not None:
                state.numerator = state.numerator * rescale
                state.normaliser = state.normaliser * rescale
        state.shift = shift
        return torch.exp(logits - shift) * self.n_features**-0.5

    def _causal_numerator(
        self, rot_q: torch.Tensor, rot_k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """``Σ_{s<=t} (R_t φ(q_t))ᵀ (R_s φ(k_s)) v_s`` for every t, chunk by chunk."""
        seq_len = rot_q.shape[-2]
        chunk = min(self.chunk_size, seq_len)
        pad = (-seq_len) % chunk
        if pad:  # zero keys contribute nothing; padded query rows are cut off below
            rot_q, rot_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (rot_q, rot_k, v))
        n_chunks = (seq_len + pad) // chunk
        qc = rot_q.unflatten(-2, (n_chunks, chunk))  # [..., N, C, F]
        kc = rot_k.unflatten(-2, (n_chunks, chunk))
        vc = v.unflatten(-2, (n_chunks, chunk))
        # State carried into each chunk: sums over all earlier chunks (exclusive prefix sum).
        # Shifting an inclusive cumsum (rather than subtracting the chunk's own term) keeps the
        # state of chunk n exactly independent of chunk n's tokens.
        prev_state = _exclusive_cumsum(kc.transpose(-1, -2) @ vc, dim=-3)  # [..., N, F, Dv]
        # Inside a chunk: the causal chunk × chunk product.
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=rot_q.device).tril()
        local = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [..., N, C, C]
        numerator = local @ vc + qc @ prev_state
        return numerator.flatten(-3, -2)[..., :seq_len, :]

    def attention_flops_per_token(self, n_ctx: int) -> int:
        """Forward FLOPs per token of the attention products (2 per multiply-add), counted as for
        softmax attention: products only, not the feature map's exp, RoPE or prefix sums.

        Per query head: reading the state ``2·F·hd`` and the normaliser ``2·F``; causal adds the
        ``chunk × chunk`` product inside each chunk, ``2·C·F + 2·C·hd`` with
        ``C = min(chunk_size, n_ctx)`` (the full square, as computed). Per K/V head: building
        the state ``2·F·hd``. FAVOR+ adds projecting queries and keys, ``2·hd·F`` per head.
        """
        features, head_dim = self.n_features, self.head_dim
        per_query_head = 2 * features * head_dim + 2 * features
        if self.causal:
            chunk = min(self.chunk_size, n_ctx)
            per_query_head += 2 * chunk * features + 2 * chunk * head_dim
        per_kv_head = 2 * features * head_dim
        flops = self.n_heads * per_query_head + self.n_kv_heads * per_kv_head
        if self.projection is not None:
            flops += 2 * head_dim * features * (self.n_heads + self.n_kv_heads)
        return flops

    # -- redrawing FAVOR+ features --------------------------------------------------------------

    def redraw_projection(self, step: int) -> bool:
        """Redraw the FAVOR+ projection if ``redraw_every`` divides ``step`` (``step >= 1``) and
        the module is trained (a frozen module keeps it, so frozen pieces and their cached
        outputs never change). The draw depends only on ``seed`` and ``step``; the projection is
        overwritten in place, so it stays in the state_dict and a resumed run is exact."""
        if self.projection is None or self.redraw_every is None:
            return False
        if step < 1 or step % self.redraw_every:
            return False
        if not any(p.requires_grad for p in self.parameters()):
            return False
        generator = torch.Generator().manual_seed(_redraw_seed(self.seed, step))
        drawn = _orthogonal_random_features(
            self.n_features, self.head_dim, generator, self.sampling
        )
        with torch.no_grad():
            self.projection.copy_(drawn)
        return True


def redraw_kernel_features(model: nn.Module, step: int) -> int:
    """Redraw the projection of every FAVOR+ attention in ``model`` that is due at optimizer
    step ``step`` (see `KernelAttention.redraw_projection`); returns how many were redrawn.
    Call it after each optimizer step; the draws are deterministic in (kernel seed, step)."""
    return sum(
        module.redraw_projection(step)
        for module in model.modules()
        if isinstance(module, KernelAttention)
    )


def _redraw_seed(seed: int, step: int) -> int:
    """A generator seed for (kernel seed, step), distinct from the initial draw's ``seed``."""
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % 2**63


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[n] = x[0] + ... + x[n-1]`` along ``dim`` (zero for n = 0)."""
    inclusive = torch.cumsum(x, dim=dim)
    zero = torch.zeros_like(inclusive.narrow(dim, 0, 1))
    return torch.cat((zero, inclusive.narrow(dim, 0, x.shape[dim] - 1)), dim=dim)


def _orthogonal_random_features(
    n_features: int, dim: int, generator: torch.Generator, sampling: FavorSampling = "orthogonal"
) -> torch.Tensor:
    """FAVOR+ projection ``[n_features, dim]`` built from blocks of ``dim`` orthogonal directions.

    - ``"orthogonal"`` (Performer's FAVOR+): ``n_features`` directions, each scaled to the norm
      of a Gaussian vector (chi-distributed), so every row is marginally N(0, I) and the kernel
      estimate is unbiased; orthogonality lowers its variance.
    - ``"antithetic"``: ``n_features / 2`` such rows ``ω`` and their negatives ``-ω`` (the
      Performer's hyperbolic positive features): still unbiased, and the odd terms of
      ``exp(ωᵀz)`` cancel within each pair.
    - ``"regularized"``: as antithetic, but every row has norm ``sqrt(dim)`` (the Performer
      reference's ``scaling=1``). A full block then reproduces the second-order term of the
      kernel exactly in every draw; the estimate is biased from the fourth order on (its mean is
      ``exp(-(|x|²+|y|²)/2) · 0F1(; dim/2; dim·|x+y|²/4)`` instead of ``exp(xᵀy)``), for a much
      lower error at small feature counts.

    An odd ``n_features`` with a paired sampling keeps the first ``n_features`` rows of
    ``[ω; -ω]`` (the last direction unpaired).
    """
    if sampling not in FAVOR_SAMPLINGS:
        raise ValueError(f"sampling must be one of {FAVOR_SAMPLINGS}, got {sampling!r}")
    paired = sampling != "orthogonal"
    n_directions = math.ceil(n_features / 2) if paired else n_features
    blocks = []
    for _ in range(math.ceil(n_directions / dim)):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        # Fixing the signs by diag(R) makes Q Haar-distributed; without it, Householder QR
        # biases the directions and so the kernel estimate.
        blocks.append((q * torch.sign(torch.diagonal(r))).T)
    rows = torch.cat(blocks, dim=0)[:n_directions]
    if sampling == "regularized":
        norms = torch.full((n_directions,), math.sqrt(dim), dtype=torch.float64)
    else:
        gaussian = torch.randn(n_directions, dim, generator=generator, dtype=torch.float64)
        norms = gaussian.norm(dim=1)
    rows = rows * norms.unsqueeze(1)
    if paired:
        rows = torch.cat((rows, -rows), dim=0)[:n_features]
    return rows.float()
