"""Kernel (linear) attention with an elu+1 or FAVOR+ feature map, its running-sum generation
form, and the FAVOR+ random projections with their redraws during training."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from stackwise.model.attention.cache import KernelState, _check_causal_cache
from stackwise.model.attention.common import (
    FAVOR_SAMPLINGS,
    AttentionMode,
    FavorSampling,
    RotaryEmbedding,
    _check_mode,
    _head_layout,
    apply_rotary,
)


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
