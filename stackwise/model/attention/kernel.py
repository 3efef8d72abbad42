"""Kernel (linear) attention with an elu+1 or FAVOR+ feature map, its running-sum generation
form, and the FAVOR+ random projections with their redraws during training."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
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

#: One segment of the causal scan: φ(q), φ(k), v and the rotation table of its positions (None
#: without RoPE).
_Segment = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


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
    sum of φ(k) for the normaliser — so no T×T matrix is built. Query heads that share a K/V
    head share its φ(k) and states.

    The causal scan runs over segments of ``segment_size`` tokens (rounded down to whole chunks),
    carrying ``S`` and ``z`` from one segment to the next (`_causal_scan`, which `forward_cached`
    also uses, starting from the cached sums): φ, RoPE, the per-chunk states and their prefix
    sum, the chunk products and the normaliser are computed one segment at a time, so no
    intermediate spans more than a segment, the working set stays the same at any T, and the
    time per token no longer grows with T. (Unsegmented, the per-chunk states ``[N_chunks, F,
    head_dim]``, the φ tensors and the prefix sums over all of T fall out of cache at long T; a
    prefix sum along T, over a tensor whose last axis is F, slows per element as T grows.) Only
    the FAVOR+ key log-features are computed over the whole sequence first, for the key shift.
    The default 256 was measured as in ``benchmarks/bench_attention.py`` (forward + backward,
    d_model 256, 4 heads of 64, batch 1, one CPU thread of a 2-core AMD EPYC with 1 MiB of L2,
    µs per token at T = 1024 -> 4096): FAVOR+ (F = 266) 66 -> 71 with segments of 256,
    66 -> 74 with 512, 69 -> 85 with 1024, 67 -> 95 unsegmented, 74 -> 121 before segmenting;
    elu 35 -> 33 with 128 to 1024, 36 -> 37 unsegmented. A FAVOR+ segment's φ(q) is then about
    1 MiB (4 heads × 256 × 266 floats), an L2-sized block; 128 was no faster. Chunk 64 stays:
    32 was slower at long T, 128 no better. The benchmark's time(4096)/time(1024) is then
    elu 4.08, FAVOR+ 3.86; timed alternately with the unsegmented code, 4096 tokens take 131
    and 260 ms, against 148 and 331 ms before.

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
        segment_size: int = 256,
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
        if chunk_size < 1 or segment_size < 1:
            raise ValueError(
                f"chunk_size and segment_size must be at least 1, got {chunk_size}, {segment_size}"
            )
        n_kv_heads, self.head_dim = _head_layout(d_model, n_heads, n_kv_heads)
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.causal = attention_mode == "causal"
        self.feature_map = feature_map
        self.chunk_size = chunk_size
        self.segment_size = segment_size
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
            return self._key_features(x, valid, None)
        logits = self._favor_logits(x)
        if is_query:  # one shift per row
            shift = logits.amax(dim=-1, keepdim=True)
            # The shift cancels between numerator and denominator: it carries no gradient.
            return torch.exp(logits - shift.detach()) * self.n_features**-0.5
        return self._key_features(logits, valid, self._key_shift(logits, valid))

    def _key_shift(self, logits: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """FAVOR+ keys' shift ``[..., 1, 1]``: the largest log-feature over every real key and
        feature of the head (0 where there is none), without gradient (it cancels)."""
        with torch.no_grad():
            row_max = logits.amax(dim=-1, keepdim=True)  # [..., T, 1]
            if valid is not None:
                row_max = row_max.masked_fill(~valid, -math.inf)
            shift = row_max.amax(dim=-2, keepdim=True)
            return torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))

    def _key_features(
        self, x: torch.Tensor, valid: torch.Tensor | None, shift: torch.Tensor | None
    ) -> torch.Tensor:
        """φ(k) from keys (elu) or their FAVOR+ log-features shifted by ``shift``; 0 where
        ``valid`` is False."""
        if self.projection is None:
            phi = F.elu(x) + 1.0
            return phi if valid is None else phi.masked_fill(~valid, 0.0)
        assert shift is not None
        if valid is not None:  # exp(-inf) = 0, and so is its gradient
            x = x.masked_fill(~valid, -math.inf)
        return torch.exp(x - shift) * self.n_features**-0.5

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
        rotation = None
        if self.rotary is not None:
            rotation = self.rotary.rotation(seq_len, x.device, q.dtype)
        if self.causal:
            return self.o_proj(self._causal_forward(q, k, v, valid, rotation))
        phi_q, phi_k = self._phi(q, is_query=True), self._phi(k, is_query=False, valid=valid)
        rot_q, rot_k = phi_q, phi_k
        if rotation is not None:
            rot_q, rot_k = apply_rotary(phi_q, rotation), apply_rotary(phi_k, rotation)
        numerator = rot_q @ (rot_k.transpose(-1, -2) @ v)
        z = phi_k.sum(dim=-2, keepdim=True)  # [B, kv, 1, 1, F]
        denominator = (phi_q @ z.transpose(-1, -2)).squeeze(-1)
        bound = phi_q.sum(-1) * z.sum(-1)
        return self.o_proj(self._merge_heads(self._normalise(numerator, denominator, bound)))

    def _causal_forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor | None,
        rotation: torch.Tensor | None,
    ) -> torch.Tensor:
        """Causal outputs ``[B, T, n_heads · head_dim]`` (before ``o_proj``), segment by
        segment: each segment's features are computed just before they are used. Only the
        FAVOR+ key log-features are computed over the whole sequence first, for their shift."""
        keys, shift = k, None
        if self.projection is not None:
            keys = self._favor_logits(k)
            shift = self._key_shift(keys, valid)
        size = self._segment_length()
        # `split` (not slicing): its backward concatenates the segments' gradients once.
        pieces: list[Sequence[torch.Tensor | None]] = [t.split(size, dim=-2) for t in (q, keys, v)]
        n_segments = len(pieces[0])
        pieces.append([None] * n_segments if valid is None else valid.split(size, dim=-2))
        pieces.append([None] * n_segments if rotation is None else rotation.split(size, dim=0))

        def segments() -> Iterator[_Segment]:
            for q_seg, k_seg, v_seg, valid_seg, rotation_seg in zip(*pieces, strict=True):
                assert q_seg is not None and k_seg is not None and v_seg is not None
                phi_q = self._phi(q_seg, is_query=True)
                phi_k = self._key_features(k_seg, valid_seg, shift)
                yield phi_q, phi_k, v_seg, rotation_seg

        chunk = min(self.chunk_size, q.shape[-2])
        out, _, _ = self._causal_scan(segments(), None, None, chunk)
        return out

    def _segment_length(self) -> int:
        """Tokens per segment of the causal scan: ``segment_size`` rounded down to a multiple of
        ``chunk_size`` (at least one chunk), so segments split no chunk."""
        return max(1, self.segment_size // self.chunk_size) * self.chunk_size

    def _causal_scan(
        self,
        segments: Iterable[_Segment],
        numerator_state: torch.Tensor | None,
        normaliser: torch.Tensor | None,
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Causal outputs ``[B, T, n_heads · head_dim]`` (before ``o_proj``) of consecutive
        segments ``(φ(q), φ(k), v, rotation or None)``, carrying the running sums
        ``Σ R_s φ(k_s) v_sᵀ`` ``[B, kv, 1, F, head_dim]`` and ``Σ φ(k_s)`` ``[B, kv, 1, 1, F]``
        (None: nothing before) from one segment to the next; returns the outputs concatenated
        along T and both sums after the last segment. Only that concatenation spans more than
        one segment. ``chunk``: the chunk length (``min(chunk_size, T)`` of the whole input, so
        a short last segment is padded to a chunk as an unsegmented scan would be)."""
        outputs = []
        for phi_q, phi_k, v, rotation in segments:
            rot_q, rot_k = phi_q, phi_k
            if rotation is not None:
                rot_q, rot_k = apply_rotary(phi_q, rotation), apply_rotary(phi_k, rotation)
            numerator, numerator_state = self._causal_numerator(
                rot_q, rot_k, v, numerator_state, chunk
            )
            z = torch.cumsum(phi_k, dim=-2)  # [B, kv, 1, T, F]: Σ_{s<=t} φ(k_s)
            if normaliser is not None:
                z = z + normaliser
            normaliser = z[..., -1:, :]
            denominator = (phi_q * z).sum(-1)  # per-t dot (a batched matmul is slower)
            bound = phi_q.sum(-1) * z.sum(-1)
            outputs.append(self._merge_heads(self._normalise(numerator, denominator, bound)))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return out, numerator_state, normaliser

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

    def _normalise(
        self, numerator: torch.Tensor, denominator: torch.Tensor, bound: torch.Tensor
    ) -> torch.Tensor:
        """``numerator / (denominator + eps · bound)`` ``[B, kv, group, T, head_dim]``; a query
        with no real key (denominator 0) outputs 0."""
        denominator = denominator + self.eps * bound
        denominator = denominator.masked_fill(denominator == 0, 1.0)
        return numerator / denominator.unsqueeze(-1)

    def _merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head outputs ``[B, kv, group, T, head_dim]`` as ``[B, T, n_heads · head_dim]``."""
        batch, seq_len = out.shape[0], out.shape[3]
        return out.permute(0, 3, 1, 2, 4).reshape(batch, seq_len, self.n_heads * self.head_dim)

    def new_cache(self) -> KernelState:
        return KernelState()

    def forward_cached(self, x: torch.Tensor, state: KernelState) -> torch.Tensor:
        """Outputs for the next tokens ``x [B, T_new, D]`` after the ``state.length`` seen ones
        (causal mode, no padding), from the running sums in `state`, which are then extended:
        the new tokens are scanned as in `forward` (segment by segment, chunk by chunk), starting
        from the sums in `state` instead of zero. Cost per token is constant."""
        _check_causal_cache(self.causal)
        new, start = x.shape[1], state.length
        q, k, v = self._heads(x)
        phi_q = self._phi(q, is_query=True)
        phi_k = self._running_key_features(k, state)
        size = self._segment_length()
        rotations: Sequence[torch.Tensor | None] = [None] * -(-new // size)
        if self.rotary is not None:
            rotation = self.rotary.rotation(start + new, x.device, phi_q.dtype)[start:]
            rotations = rotation.split(size, dim=0)
        segments = zip(
            phi_q.split(size, dim=-2),
            phi_k.split(size, dim=-2),
            v.split(size, dim=-2),
            rotations,
            strict=True,
        )
        chunk = min(self.chunk_size, new)
        out, state.numerator, state.normaliser = self._causal_scan(
            segments, state.numerator, state.normaliser, chunk
        )
        state.length = start + new
        return self.o_proj(out)

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
        self,
        rot_q: torch.Tensor,
        rot_k: torch.Tensor,
        v: torch.Tensor,
        state: torch.Tensor | None,
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``Σ_{s<=t} (R_t φ(q_t))ᵀ (R_s φ(k_s)) v_s`` for every t of a segment, chunk by chunk,
        plus ``(R_t φ(q_t))ᵀ state`` (the sum over earlier segments; None: zero); returns it and
        the state after the segment."""
        seq_len = rot_q.shape[-2]
        chunk = min(chunk, seq_len)
        pad = (-seq_len) % chunk
        if pad:  # zero keys contribute nothing; padded query rows are cut off below
            rot_q, rot_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (rot_q, rot_k, v))
        n_chunks = (seq_len + pad) // chunk
        qc = rot_q.unflatten(-2, (n_chunks, chunk))  # [..., N, C, F]
        kc = rot_k.unflatten(-2, (n_chunks, chunk))
        vc = v.unflatten(-2, (n_chunks, chunk))
        chunk_states = kc.transpose(-1, -2) @ vc  # [..., N, F, Dv]
        # State carried into each chunk: the segment's state plus the sums over its earlier
        # chunks. A prefix sum of (state, chunk 0, ..., chunk N-2) — rather than subtracting
        # each chunk's own term from an inclusive one — keeps the state of chunk n exactly
        # independent of chunk n's tokens.
        first = (
            torch.zeros_like(chunk_states[..., :1, :, :]) if state is None else state.unsqueeze(-3)
        )
        prev_state = torch.cumsum(torch.cat((first, chunk_states[..., :-1, :, :]), dim=-3), -3)
        # Inside a chunk: the causal chunk × chunk product.
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=rot_q.device).tril()
        local = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [..., N, C, C]
        numerator = local @ vc + qc @ prev_state
        state = prev_state[..., -1, :, :] + chunk_states[..., -1, :, :]
        return numerator.flatten(-3, -2)[..., :seq_len, :], state

    def attention_flops_per_token(self, n_ctx: int) -> int:
        """Forward FLOPs per token of the attention products (2 per multiply-add), counted as for
        softmax attention: products only, not the feature map's exp, RoPE or prefix sums.

        Per query head: reading the state ``2·F·hd`` and the normaliser ``2·F`` (in causal mode
        a per-token dot taken element-wise, which torch's FLOP counter does not see); causal
        adds the ``chunk × chunk`` product inside each chunk, ``2·C·F + 2·C·hd`` with
        ``C = min(chunk_size, n_ctx)`` (the full square, as computed; segments are whole chunks,
        so segmenting changes nothing here). Per K/V head: building
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
