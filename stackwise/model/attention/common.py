"""What the attention modules share: the attention modes, rotary position embeddings (RoPE),
the boolean SDPA mask of padding and causality, and the checks of modes and head layouts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The modes, and how FAVOR+ draws its random projection (see
# `kernel._orthogonal_random_features`), are block settings: defined with the block spec.
from stackwise.config.blocks import ATTENTION_MODES, FAVOR_SAMPLINGS, AttentionMode, FavorSampling

__all__ = [
    "ATTENTION_MODES",
    "FAVOR_SAMPLINGS",
    "AttentionMode",
    "FavorSampling",
    "RotaryEmbedding",
    "apply_rotary",
    "build_attention_mask",
]


# --------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021) of width ``dim`` for positions ``0..T-1``.

    Channel pairs ``(2i, 2i+1)`` are read as one complex number and rotated by the angle
    ``position * theta^(-2i/dim)``: a single complex multiply, forward and backward, which is
    cheaper than the "rotate half" formulation's five element-wise passes. The rotation table
    (cos, sin) is cached per (device, precision) and grown on demand; it is not part of the
    state_dict because it is a pure function of ``dim`` and ``theta``. `share_tables` lets
    the rotary embeddings of many blocks hold one table (a rack does this for its blocks).
    """

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE needs an even dimension, got {dim}")
        self.dim = dim
        self.theta = theta
        self._cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def share_tables(self, tables: dict[tuple[Any, ...], torch.Tensor]) -> None:
        """Keep the rotation tables in `tables` (shared with other rotary embeddings; entries
        are keyed by width and base, so embeddings of different shapes can share it)."""
        self._cache = tables

    def rotation(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[seq_len, dim/2, 2]``: (cos, sin) of each position's angle for each channel pair,
        in float64 for float64 inputs and float32 otherwise."""
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (self.dim, self.theta, device, table_dtype)
        cached = self._cache.get(key)
        if cached is None or cached.shape[0] < seq_len:
            length = max(seq_len, 2 * cached.shape[0] if cached is not None else 0)
            # Angles in float64 on the CPU so long positions stay exact, then cast once.
            exponents = torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim
            angles = torch.outer(torch.arange(length, dtype=torch.float64), self.theta**-exponents)
            cached = torch.stack((angles.cos(), angles.sin()), dim=-1).to(device, table_dtype)
            self._cache[key] = cached
        return cached[:seq_len]

    def clear_cache(self) -> None:
        """Forget the rotation tables, shared ones included (the next call builds one for its
        own length)."""
        self._cache.clear()

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate ``x [..., T, dim]`` by its position along the second-to-last axis, counted
        from ``start``."""
        return apply_rotary(x, self.rotation(start + x.shape[-2], x.device, x.dtype)[start:])


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of ``x [..., dim]`` by ``rotation`` ((cos, sin) pairs,
    broadcastable to ``[..., dim/2, 2]``). Half-precision inputs are rotated in float32."""
    pairs = x.to(torch.promote_types(x.dtype, torch.float32))
    if torch.compiler.is_compiling():
        # Inductor generates no code for complex numbers; this real form fuses instead, on any
        # layout (reading the layout below would break the compiled graph).
        real, imag = pairs.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rotation.unbind(-1)
        rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)
    strides = pairs.stride()
    if pairs.storage_offset() % 2 or strides[-1] != 1 or any(s % 2 for s in strides[:-1]):
        # A slice at an odd channel offset or with an odd row stride (MLA's RoPE part after an
        # odd kv_lora_rank or head width) cannot be viewed as complex pairs in place. A copy,
        # not `contiguous()`: a slice with only size-1 outer dims (one token of one sequence)
        # counts as contiguous and would keep its odd offset.
        pairs = pairs.clone(memory_format=torch.contiguous_format)
    pairs = pairs.unflatten(-1, (-1, 2))
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
