"""Attention modules: causality, padding, GQA grouping, MLA absorption, linear-attention exactness."""

from __future__ import annotations

import pytest
import torch

from stackwise.model import create_simple_rack
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
def test_right_padding_does_not_change_real_tokens(
    attention_type: str, options: dict, mode: str
) -> None:
    rack = tiny_rack(attention_type, mode, **options)
    gen = torch.Generator().manual_seed(2)
    lengths = [13, 9]
    batch = torch.randint(0, VOCAB, (2, 16), generator=gen)
    mask = torch.zeros(2, 16, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    with torch.no_grad():
        padded = rack(batch, attention_mask=mask)
        for row, length in enumerate(lengths):
            alone = rack(batch[row : row + 1, :length])
            torch.testing.assert_close(padded[row, :length], alone[0], rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_gqa_with_all_kv_heads_equals_mha(mode: str) -> None:
    torch.manual_seed(0)
    mha = GroupedQueryAttention(D_MODEL, n_heads=4, attention_mode=mode)
    gqa = GroupedQueryAttention(D_MODEL, n_heads=4, n_kv_heads=4, attention_mode=mode)
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 11, D_MODEL)
    mask = torch.ones(2, 11)
    mask[1, 7:] = 0
    torch.testing.assert_close(gqa(x), mha(x), rtol=0, atol=0)
    torch.testing.assert_close(gqa(x, mask), mha(x, mask), rtol=0, atol=0)


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


def test_mla_shares_one_latent_and_one_rope_key() -> None:
    mla = MultiHeadLatentAttention(D_MODEL, n_heads=4, kv_lora_rank=10, qk_rope_head_dim=4)
    # K/V come from a single rank-10 latent plus one 4-wide RoPE key shared by all heads.
    assert mla.kv_down.out_features == 10 + 4
    assert mla.kv_up.in_features == 10
    assert mla.kv_up.out_features == 4 * 2 * (D_MODEL // 4)


# -- kernel (linear) attention ----------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("chunk_size", [4, 64])
@pytest.mark.parametrize("feature_map", ["elu", "favor"])
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_kernel_attention_equals_quadratic_reference(
    mode: str, feature_map: str, chunk_size: int, n_kv_heads: int
) -> None:
    torch.manual_seed(0)
    attn = KernelAttention(
        D_MODEL, n_heads=4, n_kv_heads=n_kv_heads, attention_mode=mode,
        feature_map=feature_map, chunk_size=chunk_size,
    ).double()  # fmt: skip
    x = torch.randn(3, 19, D_MODEL, dtype=torch.float64)  # 19: not a multiple of the chunk
    mask = torch.ones(3, 19)
    mask[1, 15:] = 0
    mask[2, :5] = 0
    torch.testing.assert_close(attn(x), attn.reference_forward(x), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(
        attn(x, mask), attn.reference_forward(x, mask), rtol=1e-9, atol=1e-10
    )


def test_favor_features_estimate_the_softmax_kernel() -> None:
    head_dim = 8
    attn = KernelAttention(head_dim * 2, n_heads=2, feature_map="favor", n_features=4096, seed=3)
    gen = torch.Generator().manual_seed(0)
    q = 0.5 * torch.randn(64, head_dim, generator=gen)
    k = 0.5 * torch.randn(64, head_dim, generator=gen)
    estimate = attn._phi(q, is_query=False) @ attn._phi(k, is_query=False).T
    exact = torch.exp(q @ k.T / head_dim**0.5)
    relative_error = ((estimate - exact).abs() / exact).mean()
    assert relative_error < 0.05


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
