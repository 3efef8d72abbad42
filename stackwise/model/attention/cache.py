"""Caches of the incremental (generation) forwards and the causal attention that reads them.

MHA/GQA cache their rotated keys and values (`KVCache`), MLA its normed latent and rotated RoPE
key (`LatentCache`), kernel attention its running sums (`KernelState`); the first two grow by
`SequenceBuffer`, and `_cached_sdpa` attends the new queries to everything cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
