"""Attention modules: causality, padding, GQA grouping, MLA absorption, linear-attention exactness."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from stackwise.model import create_simple_rack, redraw_kernel_features
from stackwise.model.attention import (
    GroupedQueryAttention,
    KernelAttention,
    MultiHeadLatentAttention,
    RotaryEmbedding,
    apply_rotary,
    build_attention_mask,
)

D_MODEL = 32
VOCAB = 61

# (attention_type, extra block options) — every attention type and both kernel feature maps.
ATTENTIONS = [
    ("mha", {}),
    ("gqa", {"n_kv_heads": 2}),
    ("mla", {"kv_lora_rank": 12, "q_lora_rank": 16}),
    ("mla", {"kv_lora_rank": 8}),
    ("kernel", {"kernel_feature_map": "elu", "kernel_chunk_size": 5}),
    ("kernel", {"kernel_feature_map": "favor", "kernel_chunk_size": 5, "kernel_n_features": 24}),
]
IDS = [f"{kind}-{'-'.join(f'{k}={v}' for k, v in opts.items())}" for kind, opts in ATTENTIONS]


# -- independent references: written from the papers, sharing no code with the modules --------


def ref_rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoPE of ``x [..., T, D]`` at positions 0..T-1: channels (2i, 2i+1) rotated by the angle
    ``t · theta^(-2i/D)``, written with cos/sin (the module multiplies complex numbers)."""
    seq_len, dim = x.shape[-2:]
    frequencies = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * frequencies
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def ref_allowed(mask: torch.Tensor | None, causal: bool, batch: int, seq_len: int) -> torch.Tensor:
    """``[B, 1, T, T]``: query t may use key s (s is a real token, and s <= t when causal)."""
    keys = torch.ones(batch, seq_len, dtype=torch.bool) if mask is None else mask.bool()
    allowed = keys[:, None, None, :].expand(batch, 1, seq_len, seq_len)
    if causal:
        allowed = allowed & torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return allowed


def ref_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(~allowed, -math.inf).softmax(dim=-1)


def ref_heads(w: torch.Tensor, x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``x @ wᵀ`` split into heads: ``[B, heads, T, width]``."""
    batch, seq_len, _ = x.shape
    return (x @ w.T).view(batch, seq_len, n_heads, -1).transpose(1, 2)


def ref_grouped_attention(
    attn: GroupedQueryAttention, x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Naive O(T²) grouped-query attention from the module's weights: query head h reads K/V head
    ``h // (n_heads / n_kv_heads)``; RoPE on q and k; scores scaled by 1/sqrt(head_dim)."""
    n_q, n_kv, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w_q, w_k, w_v = attn.qkv_proj.weight.split((n_q * head_dim, n_kv * head_dim, n_kv * head_dim))
    q, k, v = ref_heads(w_q, x, n_q), ref_heads(w_k, x, n_kv), ref_heads(w_v, x, n_kv)
    kv_of = torch.arange(n_q) // (n_q // n_kv)
    k, v = k[:, kv_of], v[:, kv_of]
    if attn.rotary is not None:
        q, k = ref_rope(q), ref_rope(k)
    allowed = ref_allowed(mask, attn.causal, x.shape[0], x.shape[1])
    out = ref_softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), allowed) @ v
    return out.transpose(1, 2).flatten(2) @ attn.o_proj.weight.T


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def ref_mla(mla: MultiHeadLatentAttention, x: torch.Tensor, mask: torch.Tensor | None):
    """Naive MLA (DeepSeek-V2 section 2.1) from the module's weights. Per token there is ONE
    latent ``c`` and ONE RoPE key ``k_rope``; head h's key is ``[W_uk,h c | k_rope]`` and its
    value ``W_uv,h c``. Returns the output and the per-token ``(c, k_rope)``."""
    n_heads, head_dim, rank, rope_dim = mla.n_heads, mla.head_dim, mla.kv_lora_rank, mla.rope_dim
    h_q = x
    if mla.q_down is not None and mla.q_norm is not None:
        h_q = ref_rms_norm(x @ mla.q_down.weight.T, mla.q_norm.weight, mla.q_norm.eps)
    q = ref_heads(mla.q_proj.weight, h_q, n_heads)
    q_nope, q_rope = q[..., :head_dim], ref_rope(q[..., head_dim:])
    down = x @ mla.kv_down.weight.T
    latent = ref_rms_norm(down[..., :rank], mla.kv_norm.weight, mla.kv_norm.eps)  # [B, T, r]
    k_rope = ref_rope(down[..., rank:])  # [B, T, rope_dim]
    w_up = mla.kv_up.weight.view(n_heads, 2 * head_dim, rank)
    k_nope = torch.einsum("btr,hdr->bhtd", latent, w_up[:, :head_dim])
    v = torch.einsum("btr,hdr->bhtd", latent, w_up[:, head_dim:])
    scores = q_nope @ k_nope.transpose(-1, -2) + q_rope @ k_rope.transpose(-1, -2)[:, None]
    allowed = ref_allowed(mask, mla.causal, x.shape[0], x.shape[1])
    weights = ref_softmax(scores / math.sqrt(head_dim + rope_dim), allowed)
    out = (weights @ v).transpose(1, 2).flatten(2) @ mla.o_proj.weight.T
    return out, latent, k_rope


def ref_phi(attn: KernelAttention, u: torch.Tensor) -> torch.Tensor:
    """The feature maps as the papers write them, without any stabilising shift:
    elu(u) + 1, or FAVOR+ ``exp(wᵀu' - |u'|²/2) / sqrt(m)`` with ``u' = u / d^(1/4)``."""
    if attn.projection is None:
        return F.elu(u) + 1.0
    u = u / attn.head_dim**0.25
    logits = u @ attn.projection.to(u.dtype).T - 0.5 * (u * u).sum(-1, keepdim=True)
    return torch.exp(logits) / math.sqrt(attn.n_features)


def ref_kernel_attention(
    attn: KernelAttention, x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Kernel attention as an explicit T×T product (RoFormer section 3.3): weights
    ``(R_t φ(q_t))ᵀ (R_s φ(k_s))`` in the numerator, ``φ(q_t)ᵀ φ(k_s)`` in the denominator."""
    n_q, n_kv, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w_q, w_k, w_v = attn.qkv_proj.weight.split((n_q * head_dim, n_kv * head_dim, n_kv * head_dim))
    q, k, v = ref_heads(w_q, x, n_q), ref_heads(w_k, x, n_kv), ref_heads(w_v, x, n_kv)
    kv_of = torch.arange(n_q) // (n_q // n_kv)
    phi_q, phi_k, v = ref_phi(attn, q), ref_phi(attn, k)[:, kv_of], v[:, kv_of]
    allowed = ref_allowed(mask, attn.causal, x.shape[0], x.shape[1])
    denominator_weights = (phi_q @ phi_k.transpose(-1, -2)) * allowed
    numerator_weights = denominator_weights
    if attn.rotary is not None:
        numerator_weights = (ref_rope(phi_q) @ ref_rope(phi_k).transpose(-1, -2)) * allowed
    out = (numerator_weights @ v) / denominator_weights.sum(-1, keepdim=True)
    return out.transpose(1, 2).flatten(2) @ attn.o_proj.weight.T


def tiny_rack(attention_type: str, mode: str, **options: object):
    return create_simple_rack(
        n_stacks=1,
        blocks_per_stack=2,
        d_model=D_MODEL,
        n_heads=4,
        vocab_size=VOCAB,
        attention_type=attention_type,
        attention_mode=mode,
        seed=0,
        **options,
    ).eval()


@pytest.mark.parametrize(("attention_type", "options"), ATTENTIONS, ids=IDS)
def test_causal_mode_never_looks_ahead(attention_type: str, options: dict) -> None:
    rack = tiny_rack(attention_type, "causal", **options)
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    t = 8
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % VOCAB
    with torch.no_grad():
        before, after = rack(ids), rack(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
    assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().max() > 1e-4


@pytest.mark.parametrize(("attention_type", "options"), ATTENTIONS, ids=IDS)
def test_bidirectional_mode_sees_the_future(attention_type: str, options: dict) -> None:
    rack = tiny_rack(attention_type, "bidirectional", **options)
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % VOCAB
    with torch.no_grad():
        before, after = rack(ids), rack(changed)
    assert (after[:, :12] - before[:, :12]).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
@pytest.mark.parametrize(("attention_type", "options"), ATTENTIONS, ids=IDS)
def test_padding_and_shifts_do_not_change_real_tokens(
    attention_type: str, options: dict, mode: str
) -> None:
    """A sequence's outputs are the same alone, right-padded, left-padded (shifted to a later
    position) or both: attention depends on relative positions and real keys only (fp64)."""
    rack = tiny_rack(attention_type, mode, **options).double()
    gen = torch.Generator().manual_seed(2)
    # (left padding, real length) per row of a 16-wide batch; the rest is right padding
    layout = [(0, 13), (5, 9), (3, 10), (7, 9)]
    batch = torch.randint(0, VOCAB, (len(layout), 16), generator=gen)
    mask = torch.zeros(len(layout), 16, dtype=torch.long)
    for row, (left, length) in enumerate(layout):
        mask[row, left : left + length] = 1
    with torch.no_grad():
        padded = rack(batch, attention_mask=mask)
        for row, (left, length) in enumerate(layout):
            alone = rack(batch[row : row + 1, left : left + length])
            real = padded[row, left : left + length]
            torch.testing.assert_close(real, alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
@pytest.mark.parametrize(("attention_type", "options"), ATTENTIONS, ids=IDS)
def test_fully_padded_rows_are_finite(attention_type: str, options: dict, mode: str) -> None:
    rack = tiny_rack(attention_type, mode, **options)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding: in causal mode the first queries see no real key
    mask[1, :] = 0  # a row that is padding only
    with torch.no_grad():
        logits = rack(ids, attention_mask=mask)
    assert torch.isfinite(logits).all()


def test_mask_keeps_causality_and_hides_padding() -> None:
    mask = build_attention_mask(torch.tensor([[1, 1, 1, 0]]), causal=True, seq_len=4)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [1, 1, 1, 1],  # the padding query may only see itself and the past
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    bidirectional = build_attention_mask(torch.tensor([[0, 1, 1]]), causal=False, seq_len=3)[0, 0]
    assert torch.equal(
        bidirectional, torch.tensor([[1, 1, 1], [0, 1, 1], [0, 1, 1]], dtype=torch.bool)
    )


# -- MHA / GQA ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_gqa_with_all_kv_heads_equals_mha(mode: str, n_kv_heads: int) -> None:
    """MHA (n_kv_heads = n_heads), GQA and MQA against a naive softmax attention written here."""
    torch.manual_seed(0)
    attn = GroupedQueryAttention(D_MODEL, 4, n_kv_heads, attention_mode=mode).double()
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref_grouped_attention(attn, x, None))
        real = mask.bool()
        torch.testing.assert_close(attn(x, mask)[real], ref_grouped_attention(attn, x, mask)[real])


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_gqa_equals_mha_with_copied_kv_heads(mode: str) -> None:
    """Query head h uses K/V head h // (n_heads / n_kv_heads): same as MHA with K/V copied."""
    torch.manual_seed(0)
    n_heads, n_kv, head_dim = 4, 2, D_MODEL // 4
    gqa = GroupedQueryAttention(D_MODEL, n_heads, n_kv, attention_mode=mode)
    mha = GroupedQueryAttention(D_MODEL, n_heads, attention_mode=mode)
    w = gqa.qkv_proj.weight.detach()
    w_q, w_k, w_v = w.split((n_heads * head_dim, n_kv * head_dim, n_kv * head_dim))

    def expand(w_kv: torch.Tensor) -> torch.Tensor:
        return (
            w_kv.view(n_kv, head_dim, D_MODEL).repeat_interleave(n_heads // n_kv, 0).flatten(0, 1)
        )

    with torch.no_grad():
        mha.qkv_proj.weight.copy_(torch.cat((w_q, expand(w_k), expand(w_v))))
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
    x = torch.randn(2, 9, D_MODEL)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-6)


# -- MLA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_lora_rank", [None, 12])
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_mla_absorbed_equals_naive(mode: str, q_lora_rank: int | None) -> None:
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(
        D_MODEL,
        n_heads=4,
        kv_lora_rank=10,
        q_lora_rank=q_lora_rank,
        qk_rope_head_dim=4,
        attention_mode=mode,
    ).double()
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    mask = torch.ones(2, 13)
    mask[0, 9:] = 0
    torch.testing.assert_close(mla.forward_absorbed(x), mla(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mla.forward_absorbed(x, mask), mla(x, mask), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("d_model", "kv_lora_rank"), [(32, 7), (36, 8), (36, None)])
def test_mla_with_odd_latent_rank_or_head_width(d_model: int, kv_lora_rank: int | None) -> None:
    """The RoPE parts then start at an odd channel (after a 7-wide latent or a 9-wide q_nope)."""
    torch.manual_seed(0)
    if kv_lora_rank is None:  # the defaults: d_model // 4 = 9, head width 36 / 4 = 9
        rack = create_simple_rack(1, 1, d_model, n_heads=4, attention_type="mla", seed=0)
        assert rack.blocks[0].attn.kv_lora_rank == 9
        assert rack(torch.randint(0, 100, (2, 5))).shape == (2, 5, rack.vocab_size)
        return
    mla = MultiHeadLatentAttention(
        d_model, n_heads=4, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=4, attention_mode="causal"
    ).double()
    x = torch.randn(2, 9, d_model, dtype=torch.float64)
    torch.testing.assert_close(mla.forward_absorbed(x), mla(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("q_lora_rank", [None, 12])
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_mla_shares_one_latent_and_one_rope_key(
    mode: str, q_lora_rank: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both forms equal a naive MLA written here; the absorbed form attends to ONE K/V head per
    token, [latent | k_rope]; the RoPE key is shared (changing it changes every head)."""
    torch.manual_seed(0)
    n_heads, head_dim, rank, rope_dim = 4, D_MODEL // 4, 10, 4
    mla = MultiHeadLatentAttention(
        D_MODEL, n_heads, rank, q_lora_rank, rope_dim, attention_mode=mode
    ).double()
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0
    real = mask.bool()
    keys_seen: list[torch.Tensor] = []
    sdpa = F.scaled_dot_product_attention

    def record(q, k, v, **kwargs):
        keys_seen.append(k)
        return sdpa(q, k, v, **kwargs)

    with torch.no_grad():
        expected, latent, k_rope = ref_mla(mla, x, mask)
        torch.testing.assert_close(mla(x, mask)[real], expected[real])
        monkeypatch.setattr(F, "scaled_dot_product_attention", record)
        absorbed = mla.forward_absorbed(x, mask)
        monkeypatch.undo()
        torch.testing.assert_close(absorbed[real], expected[real])
        # one K "head" per token: the latent and the shared RoPE key, nothing per head
        (keys,) = keys_seen
        assert keys.shape == (2, 1, 9, rank + rope_dim)
        torch.testing.assert_close(keys[:, 0], torch.cat((latent, k_rope), dim=-1))
        # with o_proj = identity each head owns head_dim output channels: perturbing the
        # RoPE-key rows of kv_down changes every head; one head's up-projection only that head
        mla.o_proj.weight.copy_(torch.eye(D_MODEL))
        base = mla(x).view(2, 9, n_heads, head_dim)
        mla.kv_down.weight[rank:] += 0.5
        shared = mla(x).view(2, 9, n_heads, head_dim)
        mla.kv_down.weight[rank:] -= 0.5
        mla.kv_up.weight[: 2 * head_dim] += 0.5  # head 0's k_nope and v rows
        own = mla(x).view(2, 9, n_heads, head_dim)
    assert ((shared - base).abs().amax(dim=(0, 1, 3)) > 1e-3).all()
    per_head = (own - base).abs().amax(dim=(0, 1, 3))
    assert per_head[0] > 1e-3 and per_head[1:].max() == 0


# -- kernel (linear) attention ----------------------------------------------------------------


@pytest.mark.parametrize("use_rope", [True, False])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("chunk_size", [4, 64])
@pytest.mark.parametrize("feature_map", ["elu", "favor"])
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_kernel_attention_equals_quadratic_reference(
    mode: str, feature_map: str, chunk_size: int, n_kv_heads: int, use_rope: bool
) -> None:
    torch.manual_seed(0)
    attn = KernelAttention(
        D_MODEL, n_heads=4, n_kv_heads=n_kv_heads, attention_mode=mode,
        feature_map=feature_map, chunk_size=chunk_size, use_rope=use_rope,
    ).double()  # fmt: skip
    attn.eps = 0.0  # the reference has no eps: compare the exact ratio
    x = torch.randn(3, 19, D_MODEL, dtype=torch.float64)  # 19: not a multiple of the chunk
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, :5] = 0
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(
            attn(x), ref_kernel_attention(attn, x, None), rtol=1e-9, atol=1e-10
        )
        torch.testing.assert_close(
            attn(x, mask)[real], ref_kernel_attention(attn, x, mask)[real], rtol=1e-9, atol=1e-10
        )


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_causal_kernel_attention_over_several_segments_equals_quadratic_reference(
    feature_map: str,
) -> None:
    """T = 100 in segments of 32 (chunks of 8; the last segment is 4 tokens, shorter than a
    chunk), with RoPE, GQA and padding on either side: outputs and the gradients of the input
    and of both weights equal a masked O(T²) sum written here, so the running sums are carried
    exactly from segment to segment (the FAVOR+ key shift included)."""
    torch.manual_seed(0)
    attn = KernelAttention(
        D_MODEL, n_heads=4, n_kv_heads=2, attention_mode="causal", feature_map=feature_map,
        n_features=24 if feature_map == "favor" else None, chunk_size=8, segment_size=32,
    ).double()  # fmt: skip
    attn.eps = 0.0  # the reference has no eps: compare the exact ratio
    assert attn._segment_length() == 32
    seq_len = 100
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, seq_len, D_MODEL, dtype=torch.float64, generator=gen)
    mask = torch.ones(3, seq_len, dtype=torch.long)
    mask[1, 70:] = 0  # right padding across the last two segments
    mask[2, :40] = 0  # left padding over the whole first segment
    real = mask.bool()
    weights = torch.randn(3, seq_len, D_MODEL, dtype=torch.float64, generator=gen)

    def reference(x: torch.Tensor) -> torch.Tensor:
        # out_t = Σ_{s<=t, s real} (R_t φ(q_t))ᵀ (R_s φ(k_s)) v_s / Σ_{s<=t, s real} φ(q_t)ᵀ φ(k_s)
        n_q, n_kv, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        w_q, w_k, w_v = attn.qkv_proj.weight.split(
            (n_q * head_dim, n_kv * head_dim, n_kv * head_dim)
        )
        q, k, v = ref_heads(w_q, x, n_q), ref_heads(w_k, x, n_kv), ref_heads(w_v, x, n_kv)
        kv_of = torch.arange(n_q) // (n_q // n_kv)
        phi_q, phi_k, v = ref_phi(attn, q), ref_phi(attn, k)[:, kv_of], v[:, kv_of]
        t, s = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
        allowed = (s <= t) & real[:, None, None, :]  # [B, 1, T, T]
        numerator = torch.einsum("bhtf,bhsf,bhsd->bhtsd", ref_rope(phi_q), ref_rope(phi_k), v)
        numerator = (numerator * allowed[..., None]).sum(-2)
        denominator = ((phi_q @ phi_k.transpose(-1, -2)) * allowed).sum(-1, keepdim=True)
        denominator = torch.where(denominator > 0, denominator, 1.0)  # no real key: output 0
        out = numerator / denominator
        return out.transpose(1, 2).flatten(2) @ attn.o_proj.weight.T

    def outputs_and_gradients(run) -> list[torch.Tensor]:
        attn.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        out = run(leaf)
        (out * weights)[real].sum().backward()
        assert leaf.grad is not None
        grads = [p.grad for p in (attn.qkv_proj.weight, attn.o_proj.weight)]
        assert all(g is not None for g in grads)
        return [out[real].detach(), leaf.grad, *grads]  # type: ignore[list-item]

    got = outputs_and_gradients(lambda leaf: attn(leaf, mask))
    expected = outputs_and_gradients(reference)
    names = ("output", "input grad", "qkv grad", "o_proj grad")
    for name, a, b in zip(names, got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
    # The same in one segment: the segmenting changes nothing but rounding.
    attn.segment_size = 2 * seq_len
    for a, b in zip(outputs_and_gradients(lambda leaf: attn(leaf, mask)), got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_cached_kernel_attention_over_several_segments_equals_forward(feature_map: str) -> None:
    """Generation state carried across segments: a 70-token prompt (segments of 16, chunks of
    4), one token, then 29 more give the outputs of one forward over the 100 tokens."""
    torch.manual_seed(0)
    attn = KernelAttention(
        D_MODEL, n_heads=4, n_kv_heads=2, attention_mode="causal", feature_map=feature_map,
        chunk_size=4, segment_size=16,
    ).double()  # fmt: skip
    x = torch.randn(2, 100, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        full = attn(x)
        cache = attn.new_cache()
        pieces = [attn.forward_cached(x[:, a:b], cache) for a, b in ((0, 70), (70, 71), (71, 100))]
    assert cache.length == 100
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-11)


def test_kernel_segments_are_whole_chunks() -> None:
    """The segment length is ``segment_size`` rounded down to whole chunks, at least one."""
    for chunk, segment, expected in ((64, 512, 512), (64, 500, 448), (64, 10, 64), (5, 512, 510)):
        attn = KernelAttention(
            D_MODEL, 4, attention_mode="causal", chunk_size=chunk, segment_size=segment
        )
        assert attn._segment_length() == expected
    with pytest.raises(ValueError, match="segment_size"):
        KernelAttention(D_MODEL, 4, attention_mode="causal", segment_size=0)


def _favor_probe(
    head_dim: int,
    q_scale: float,
    k_scale: float,
    n_features: int | None,
    seed: int,
    mode: str,
    sampling: str = "regularized",
) -> KernelAttention:
    """A one-head FAVOR+ attention (no RoPE) whose q, k, v are ``q_scale·x``, ``k_scale·P x`` and
    ``P' x`` for random rotations P, P', and whose output projection is the identity."""
    gen = torch.Generator().manual_seed(1000 + seed)
    attn = KernelAttention(
        head_dim, 1, attention_mode=mode, use_rope=False, feature_map="favor",
        n_features=n_features, seed=seed, sampling=sampling,  # type: ignore[arg-type]
    )  # fmt: skip
    rotations = [torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen))[0] for _ in "kv"]
    eye = torch.eye(head_dim)
    with torch.no_grad():
        attn.qkv_proj.weight.copy_(torch.cat((q_scale * eye, k_scale * rotations[0], rotations[1])))
        attn.o_proj.weight.copy_(eye)
    return attn


def _softmax_attention(attn: KernelAttention, x: torch.Tensor) -> torch.Tensor:
    """Exact softmax attention of the probe's q, k, v (written here)."""
    q, k, v = (x @ w.T for w in attn.qkv_proj.weight.double().chunk(3))
    allowed = ref_allowed(None, attn.causal, x.shape[0], x.shape[1])[:, 0]
    return ref_softmax(q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim), allowed) @ v


def _relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return ((estimate - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("sampling", ["orthogonal", "antithetic"])
def test_favor_features_estimate_the_softmax_kernel(sampling: str) -> None:
    """Many features: unbiased FAVOR+ attention converges to softmax attention. Large-norm queries
    (their plain features underflow in fp32) must give the same ratios as the unshifted fp64
    formula: that is the per-query shift."""
    head_dim = 8
    x = torch.randn(2, 32, head_dim, generator=torch.Generator().manual_seed(0))
    attn = _favor_probe(head_dim, 0.5, 0.5, 8192, seed=3, mode="bidirectional", sampling=sampling)
    with torch.no_grad():
        estimate = attn(x).double()
    assert _relative_error(estimate, _softmax_attention(attn, x.double())) < 0.05
    loud = _favor_probe(head_dim, 12.0, 0.5, 64, seed=3, mode="causal")  # |q|²/sqrt(d) ≈ 400
    with torch.no_grad():
        got = loud(x)
        expected = ref_kernel_attention(loud.double(), x.double(), None)
    assert torch.isfinite(got).all()
    assert _relative_error(got.double(), expected) < 1e-3  # fp32 logits of ~400 round at 1e-5


def _hypergeometric_0f1(b: float, z: torch.Tensor, terms: int = 60) -> torch.Tensor:
    """``0F1(; b; z) = Σ_k z^k / (k! (b)_k)``, summed term by term."""
    total, term = torch.ones_like(z), torch.ones_like(z)
    for k in range(terms):
        term = term * z / ((k + 1) * (b + k))
        total = total + term
    return total


@pytest.mark.parametrize("sampling", ["orthogonal", "antithetic", "regularized"])
def test_favor_draws(sampling: str) -> None:
    """The three draws, checked row by row: orthogonal directions within each block of head_dim
    rows; antithetic and regularized rows come in pairs ``ω, -ω``; regularized norms are all
    ``sqrt(head_dim)``, the others spread like the norm of a Gaussian vector. Averaged over 600
    blocks, ``φ(x)ᵀφ(y)`` is ``exp(xᵀy)`` for the unbiased draws, and for the regularized one
    its closed-form mean ``exp(-(|x|²+|y|²)/2) · 0F1(; d/2; d|x+y|²/4)`` (a uniform direction u
    has ``E exp(r uᵀz) = 0F1(; d/2; r²|z|²/4)``), which is below ``exp(xᵀy)``."""
    dim = 8
    n_features = 2 * dim * 600
    attn = KernelAttention(
        dim, 1, feature_map="favor", n_features=n_features, use_rope=False, seed=7,
        sampling=sampling,  # type: ignore[arg-type]
    )  # fmt: skip
    rows = attn.projection.double()
    assert rows.shape == (n_features, dim)
    directions = rows[: n_features // 2] if sampling != "orthogonal" else rows
    for block in directions[: 4 * dim].split(dim):
        gram = block @ block.T
        off_diagonal = gram - torch.diag(gram.diagonal())
        assert off_diagonal.abs().max().item() < 1e-4
    norms = rows.norm(dim=1)
    if sampling == "orthogonal":
        assert not torch.equal(rows[n_features // 2 :], -rows[: n_features // 2])
    else:
        assert torch.equal(rows[n_features // 2 :], -rows[: n_features // 2])
    if sampling == "regularized":
        torch.testing.assert_close(norms, torch.full_like(norms, math.sqrt(dim)))
    else:  # chi with dim degrees of freedom: mean of the squared norm dim, variance 2·dim
        squared = norms.pow(2)
        assert abs(squared.mean().item() - dim) < 0.2
        assert abs(squared.var().item() - 2 * dim) < 1.5

    gen = torch.Generator().manual_seed(3)
    x, y = (0.35 * torch.randn(4, dim, generator=gen, dtype=torch.float64) for _ in "xy")

    def features(u: torch.Tensor) -> torch.Tensor:  # FAVOR+ written out, no shift
        return torch.exp(u @ rows.T - 0.5 * u.pow(2).sum(-1, keepdim=True)) / math.sqrt(n_features)

    estimate = (features(x) * features(y)).sum(-1)
    exact = torch.exp((x * y).sum(-1))
    if sampling == "regularized":
        z = (x + y).pow(2).sum(-1)
        mean = torch.exp(-0.5 * (x.pow(2).sum(-1) + y.pow(2).sum(-1)))
        mean = mean * _hypergeometric_0f1(dim / 2, dim * z / 4)
        torch.testing.assert_close(estimate, mean, rtol=0.01, atol=0)
        assert (mean < exact * 0.99).all()  # the bias is real, and shown
    else:
        torch.testing.assert_close(estimate, exact, rtol=0.04, atol=0)


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_favor_attention_is_stable_for_large_inputs(mode: str) -> None:
    """Large inputs in fp32 must match the plain formula in fp64. Inputs 6x larger make small
    denominators, which an absolute eps would shrink; keys 24x larger (|k|²/sqrt(d) ≈ 1600) have
    plain features that underflow to 0 in fp32 without the per-head key shift. (Causal mode with
    such keys is not checked: one shift per head lets the early keys underflow; see
    `KernelAttention`.)"""
    torch.manual_seed(0)
    attn = KernelAttention(D_MODEL, 4, attention_mode=mode, feature_map="favor", chunk_size=8)
    x = 6 * torch.randn(2, 24, D_MODEL)
    loud_keys = _favor_probe(8, 0.5, 24.0, 64, seed=1, mode=mode)
    y = torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = attn(x).double()
        expected = ref_kernel_attention(attn.double(), x.double(), None)
        got_loud = loud_keys(y).double()
        expected_loud = ref_kernel_attention(loud_keys.double(), y.double(), None)
    assert _relative_error(got, expected) < 1e-4
    if mode == "bidirectional":
        assert _relative_error(got_loud, expected_loud) < 1e-3


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_favor_with_default_features_approximates_softmax_attention(mode: str) -> None:
    """Scores with std 0.33, head_dim 16, the default 44 features: the relative error of the
    output against exact softmax attention, averaged over 4 projection seeds. Measured
    (bidirectional / causal): regularized (default) 0.315 / 0.224, antithetic 0.491 / 0.350,
    orthogonal (the Performer's FAVOR+) 0.588 / 0.398. Unbiased draws fall as
    1/sqrt(n_features) (orthogonal 0.140 / 0.088 at 2816); the regularized draw is lower
    up to about a thousand features and levels off at its bias (0.115 / 0.075 at 2816)."""
    head_dim, scale = 16, 0.33**0.5
    x = torch.randn(4, 128, head_dim, generator=torch.Generator().manual_seed(0))
    w_q, w_k, _ = _favor_probe(head_dim, scale, scale, None, 0, mode).qkv_proj.weight.chunk(3)
    scores = (x @ w_q.T) @ (x @ w_k.T).transpose(-1, -2) / head_dim**0.5
    assert scores.std().item() == pytest.approx(0.33, abs=0.01)

    def error(sampling: str, n_features: int | None) -> float:
        total = 0.0
        for seed in range(4):
            attn = _favor_probe(head_dim, scale, scale, n_features, seed, mode, sampling)
            exact = _softmax_attention(attn, x.double())
            with torch.no_grad():
                total += _relative_error(attn(x).double(), exact) / 4
        return total

    default = KernelAttention(head_dim, 1, feature_map="favor")
    assert (default.n_features, default.sampling) == (44, "regularized")
    regularized, antithetic, orthogonal = (
        error(sampling, None) for sampling in ("regularized", "antithetic", "orthogonal")
    )
    bound = {"bidirectional": 0.33, "causal": 0.24}[mode]
    assert regularized < bound < antithetic < orthogonal
    assert error("orthogonal", 2816) < 0.15


def test_kernel_flops_count_the_chunk_products() -> None:
    """Per-token forward FLOPs of kernel attention: a hand count for one shape, and the products
    the forward really runs as counted by torch (the two Linear layers taken off)."""
    attn = KernelAttention(
        32, 4, n_kv_heads=2, attention_mode="causal", feature_map="favor", n_features=16,
        chunk_size=5,
    )  # fmt: skip
    # 4 query heads, 2 K/V heads, head_dim 8, F = 16 features, chunk C = 5; 2 FLOPs per mul-add:
    projection = 2 * 8 * 16 * (4 + 2)  # FAVOR+ features of q and k: 1536
    states = 2 * 16 * 8 * 2  # φ(k)ᵀv per K/V head: 512
    reads = 4 * (2 * 16 * 8 + 2 * 16)  # φ(q)ᵀS and φ(q)ᵀz per query head: 1152
    chunk_products = 4 * (2 * 5 * 16 + 2 * 5 * 8)  # C×C causal φ(q)φ(k)ᵀ and its ·v: 960
    assert attn.attention_flops_per_token(20) == projection + states + reads + chunk_products
    linear = 2 * (32 * (4 + 2 + 2) * 8 + 32 * 32)  # qkv_proj and o_proj per token
    # Causal: φ(q_t)ᵀz_t is one dot per token, taken element-wise (multiply, then sum over F),
    # which torch's counter does not see.
    for mode, expected, unseen in (("causal", 4160, 4 * 2 * 16), ("bidirectional", 3200, 0)):
        attn.causal = mode == "causal"
        assert attn.attention_flops_per_token(20) == expected
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            attn(torch.randn(1, 20, 32))  # 20 tokens = 4 whole chunks
        assert counter.get_total_flops() / 20 - linear + unseen == expected
    # the case, elu with C = F = head_dim = 64: the chunk products are half the cost
    elu = KernelAttention(64, 1, attention_mode="causal", chunk_size=64)
    assert elu.attention_flops_per_token(4096) == 2 * 64 * 64 * 2 + 2 * 64 + 2 * 64 * (64 + 64)
    assert elu.attention_flops_per_token(16) == 2 * 64 * 64 * 2 + 2 * 64 + 2 * 16 * (64 + 64)


def test_default_feature_count_is_head_dim_log_head_dim_and_even() -> None:
    # 8·ln 8 = 16.6, 16·ln 16 = 44.4, 64·ln 64 = 266.2, 2·ln 2 = 1.4
    for head_dim, expected in ((8, 16), (16, 44), (64, 266), (2, 2), (1, 2)):
        attn = KernelAttention(head_dim * 2, 2, feature_map="favor", use_rope=False)
        assert attn.n_features == expected
    assert KernelAttention(32, 2, feature_map="elu").n_features == 16  # elu: head_dim
    with pytest.raises(ValueError, match="n_features must be even"):
        KernelAttention(32, 4, feature_map="favor", n_features=15)
    assert KernelAttention(32, 4, feature_map="favor", n_features=15, use_rope=False).n_features


def favor_rack(redraw_every: int | None = 3, kernel_seed: int = 0):
    return create_simple_rack(
        1, 2, D_MODEL, n_heads=4, vocab_size=VOCAB, attention_type="kernel", seed=0,
        kernel_feature_map="favor", kernel_redraw_every=redraw_every, kernel_seed=kernel_seed,
    )  # fmt: skip


def projections(rack) -> list[torch.Tensor]:
    return [block.attn.projection.clone() for block in rack.blocks]


def test_redraw_kernel_features_every_n_steps() -> None:
    rack = favor_rack()
    initial = projections(rack)
    assert [redraw_kernel_features(rack, step) for step in (0, 1, 2)] == [0, 0, 0]
    assert all(torch.equal(a, b) for a, b in zip(initial, projections(rack), strict=True))
    assert redraw_kernel_features(rack, 3) == 2
    third = projections(rack)
    assert all(not torch.equal(a, b) for a, b in zip(initial, third, strict=True))
    # a FAVOR+ draw: the first head_dim rows are orthogonal directions
    rows = third[0][:8].double()
    gram = rows @ rows.T
    torch.testing.assert_close(
        gram - torch.diag(gram.diagonal()),
        torch.zeros(8, 8, dtype=torch.float64),
        atol=1e-5,
        rtol=0,
    )
    # deterministic in (kernel seed, step): another rack gets the same draw at step 3, and
    # other draws at another step or with another kernel seed
    twin = favor_rack()
    redraw_kernel_features(twin, 3)
    assert torch.equal(projections(twin)[0], third[0])
    redraw_kernel_features(twin, 6)
    assert not torch.equal(projections(twin)[0], third[0])
    other_seed = favor_rack(kernel_seed=1)
    redraw_kernel_features(other_seed, 3)
    assert not torch.equal(projections(other_seed)[0], third[0])
    # part of the saved state: a fresh rack loading it computes the same outputs, bit for bit
    fresh = favor_rack()
    fresh.load_state_dict(rack.state_dict())
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(ids), rack(ids))
    # frozen blocks keep theirs; racks without redraw_every or without FAVOR+ redraw nothing
    rack.blocks[0].freeze()
    assert redraw_kernel_features(rack, 6) == 1
    assert torch.equal(rack.blocks[0].attn.projection, third[0])
    assert redraw_kernel_features(favor_rack(redraw_every=None), 3) == 0
    assert redraw_kernel_features(tiny_rack("kernel", "causal"), 3) == 0


def test_favor_projection_is_a_seeded_buffer() -> None:
    a = KernelAttention(D_MODEL, n_heads=4, feature_map="favor", seed=5)
    b = KernelAttention(D_MODEL, n_heads=4, feature_map="favor", seed=5)
    c = KernelAttention(D_MODEL, n_heads=4, feature_map="favor", seed=6)
    assert "projection" in a.state_dict()
    assert not any(p is a.projection for p in a.parameters())
    assert a.projection is not None and b.projection is not None and c.projection is not None
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, c.projection)


def test_kernel_attention_memory_does_not_grow_quadratically() -> None:
    """With chunk 16, the largest intermediate at T=2048 is far below T×T per head."""
    attn = KernelAttention(D_MODEL, n_heads=4, attention_mode="causal", chunk_size=16)
    x = torch.randn(1, 2048, D_MODEL)
    largest = 0

    def record(tensor: torch.Tensor) -> None:
        nonlocal largest
        largest = max(largest, tensor.numel())

    with torch.no_grad(), _TensorSizeMode(record):
        attn(x)
    quadratic = 4 * 2048 * 2048
    assert largest < quadratic // 16


class _TensorSizeMode(torch.overrides.TorchFunctionMode):
    """Records the size of every tensor produced inside the block."""

    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, tuple | list) else (out,):
            if isinstance(value, torch.Tensor):
                self.record(value)
        return out


# -- RoPE ------------------------------------------------------------------------------------


def test_rope_scores_depend_only_on_relative_position() -> None:
    rope = RotaryEmbedding(8)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    rotation = rope.rotation(20, torch.device("cpu"), torch.float32)

    def score(m: int, n: int) -> torch.Tensor:
        return apply_rotary(q, rotation[m]) @ apply_rotary(k, rotation[n])

    torch.testing.assert_close(score(3, 1), score(15, 13), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2))
    torch.testing.assert_close(apply_rotary(q, rotation[0]), q)  # position 0: identity
    # a rotation: norms are kept
    torch.testing.assert_close(apply_rotary(q, rotation[7]).norm(), q.norm())


def test_rope_of_a_slice_at_an_odd_offset_equals_rope_of_its_copy() -> None:
    base = torch.randn(3, 5, 11)
    part = base[..., 7:11]  # starts at channel 7, rows 11 apart: no in-place complex view
    rotation = RotaryEmbedding(4).rotation(5, torch.device("cpu"), torch.float32)
    expected = apply_rotary(part.contiguous(), rotation)
    torch.testing.assert_close(apply_rotary(part, rotation), expected, rtol=0, atol=0)
    assert not torch.equal(expected, part)


def test_rope_rotates_channel_pairs_by_position_times_frequency(monkeypatch) -> None:
    rope = RotaryEmbedding(4, theta=100.0)
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 3)  # positions 0, 1, 2
    rotated = rope(x)
    for position in range(3):
        for pair, frequency in enumerate((1.0, 100.0**-0.5)):
            angle = torch.tensor(position * frequency)
            expected = torch.stack((angle.cos(), angle.sin()))
            torch.testing.assert_close(rotated[position, 2 * pair : 2 * pair + 2], expected)
    assert rope(x.to(torch.bfloat16)).dtype == torch.bfloat16
    # the real-valued form used under torch.compile gives the same rotation
    y = torch.randn(2, 5, 3, 4)
    eager = RotaryEmbedding(4)(y)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(RotaryEmbedding(4)(y), eager)
