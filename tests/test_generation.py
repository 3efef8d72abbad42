"""Generation: KV-cache forwards against full recomputation, sampling, unmasking (tiny racks)."""

from __future__ import annotations

import pytest
import torch

from stackwise.model import create_rack_from_specs, create_simple_rack
from stackwise.model.generation import filter_logits, sampler_for, unmask_schedule

VOCAB = 61
MASK_ID = 60

# Every causal attention type, both kernel feature maps, MLA with an odd latent width (its RoPE
# key then sits at an odd offset, the case that cannot be viewed as complex pairs in place).
CAUSAL_ATTENTIONS = [
    ("mha", {}),
    ("gqa", {"n_kv_heads": 2}),
    ("mla", {"kv_lora_rank": 12, "q_lora_rank": 16}),
    ("mla", {"kv_lora_rank": 7, "qk_rope_head_dim": 6}),
    ("kernel", {"kernel_feature_map": "elu", "kernel_chunk_size": 5}),
    ("kernel", {"kernel_feature_map": "favor", "kernel_chunk_size": 5, "kernel_n_features": 24}),
]
IDS = [
    f"{kind}-{'-'.join(f'{k}={v}' for k, v in opts.items())}" for kind, opts in CAUSAL_ATTENTIONS
]


def causal_rack(kind: str, options: dict, seed: int = 0) -> torch.nn.Module:
    return create_simple_rack(
        2,
        1,
        32,
        n_heads=4,
        attention_type=kind,
        attention_mode="causal",
        vocab_size=VOCAB,
        seed=seed,
        **options,
    ).eval()


def random_ids(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("kind", "options"), CAUSAL_ATTENTIONS, ids=IDS)
def test_cached_forward_equals_full_forward(kind: str, options: dict) -> None:
    rack = causal_rack(kind, options)
    ids = random_ids((2, 23))
    with torch.no_grad():
        full = rack(ids)
        cache = rack.new_cache()
        # A prompt, single tokens, then a chunk again (prefill after decode uses the offset mask).
        pieces = [(0, 9), *((t, t + 1) for t in range(9, 14)), (14, 23)]
        cached = torch.cat([rack.forward_cached(ids[:, a:b], cache) for a, b in pieces], dim=1)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "options"), CAUSAL_ATTENTIONS, ids=IDS)
def test_cached_generation_gives_the_recompute_tokens(kind: str, options: dict) -> None:
    rack = causal_rack(kind, options)
    prompt = random_ids((2, 5))
    for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 20, "top_p": 0.95}):
        cached = rack.generate(prompt, max_new_tokens=24, seed=3, **sampling)
        recomputed = rack.generate(prompt, max_new_tokens=24, seed=3, use_cache=False, **sampling)
        assert cached.used_cache and not recomputed.used_cache
        assert cached.tokens.shape == (2, 5 + 24)
        assert torch.equal(cached.tokens, recomputed.tokens)
        assert torch.equal(cached.tokens[:, :5], prompt)


def test_favor_cache_follows_a_rising_key_shift() -> None:
    """FAVOR+ keys are shifted by their largest log-feature. The full forward knows every key;
    the cache learns of larger ones late and must rescale what it summed so far: hidden states
    whose norm grows along the sequence raise the shift at every step."""
    rack = causal_rack("kernel", {"kernel_feature_map": "favor", "kernel_n_features": 24})
    attn = rack.blocks[0].attn
    growing = torch.linspace(0.5, 6.0, 16)[None, :, None]
    x = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0)) * growing
    with torch.no_grad():
        full = attn(x)
        cache = attn.new_cache()
        steps = [attn.forward_cached(x[:, t : t + 1], cache) for t in range(16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_incremental_forward_refuses_bidirectional_racks() -> None:
    rack = create_simple_rack(1, 1, 32, n_heads=4, attention_mode="bidirectional", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="causal"):
        rack.new_cache()
    with pytest.raises(ValueError, match="causal attention in every block"):
        rack.generate([1, 2, 3], sampler="autoregressive", max_new_tokens=3)


def test_generation_is_deterministic_for_a_seed() -> None:
    rack = causal_rack("gqa", {"n_kv_heads": 2})
    first = rack.generate([1, 2, 3], max_new_tokens=20, seed=7, temperature=1.0)
    again = rack.generate([1, 2, 3], max_new_tokens=20, seed=7, temperature=1.0)
    other = rack.generate([1, 2, 3], max_new_tokens=20, seed=8, temperature=1.0)
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, other.tokens)
    # The global RNG is neither used nor disturbed.
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    rack.generate([1, 2, 3], max_new_tokens=5, seed=7)
    assert torch.equal(torch.rand(1), expected)


def test_greedy_generation_is_the_argmax_of_the_full_forward() -> None:
    """Independent reference: greedy decoding written out with the plain forward."""
    # One sequence, one token per step: MLA's RoPE key at an odd offset of a [1, 1, 1, r] slice.
    rack = causal_rack("mla", {"kv_lora_rank": 7, "qk_rope_head_dim": 6})
    tokens = [4, 8, 15]
    with torch.no_grad():
        for _ in range(10):
            tokens.append(int(rack(torch.tensor([tokens]))[0, -1].argmax()))
    generated = rack.generate([4, 8, 15], max_new_tokens=10, temperature=0.0)
    assert generated.tokens[0].tolist() == tokens


def test_generation_stops_at_eos() -> None:
    rack = causal_rack("mha", {})
    free = rack.generate([1, 2], max_new_tokens=12, temperature=0.0).tokens[0, 2:].tolist()
    eos = free[3]
    first = free.index(eos)
    stopped = rack.generate([1, 2], max_new_tokens=12, temperature=0.0, eos_id=eos)
    assert stopped.tokens[0, 2:].tolist() == free[: first + 1]  # up to and including [EOS]
    assert stopped.completions == [free[:first]]
    # In a batch a finished row keeps [EOS] while the other goes on.
    batch = rack.generate(torch.tensor([[1, 2], [9, 9]]), max_new_tokens=12, temperature=0.0)
    other = batch.tokens[1, 2:].tolist()
    if eos not in other:
        both = rack.generate(
            torch.tensor([[1, 2], [9, 9]]), max_new_tokens=12, temperature=0.0, eos_id=eos
        )
        assert both.tokens[1, 2:].tolist() == other
        assert set(both.tokens[0, 2 + first :].tolist()) == {eos}


def test_top_k_and_top_p_keep_the_hand_counted_tokens() -> None:
    probabilities = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probabilities.log()
    kept = lambda filtered: set(torch.isfinite(filtered).nonzero().flatten().tolist())  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert kept(filter_logits(logits, top_k=1)) == {1}
    # Nucleus: 0.5 alone < 0.8; 0.5 + 0.3 reaches 0.8, so {1, 3}; 0.81 needs 0.15 too.
    assert kept(filter_logits(logits, top_p=0.8)) == {1, 3}
    assert kept(filter_logits(logits, top_p=0.81)) == {1, 2, 3}
    assert kept(filter_logits(logits, top_p=0.3)) == {1}
    assert kept(filter_logits(logits, top_p=1.0)) == {0, 1, 2, 3}
    assert kept(filter_logits(logits, top_k=3, top_p=0.9)) == {1, 2, 3}


def test_top_k_one_is_greedy() -> None:
    rack = causal_rack("gqa", {"n_kv_heads": 2})
    greedy = rack.generate([5, 6], max_new_tokens=10, temperature=0.0)
    sampled = rack.generate([5, 6], max_new_tokens=10, temperature=1.5, top_k=1, seed=4)
    assert torch.equal(greedy.tokens, sampled.tokens)


# -- iterative unmasking ------------------------------------------------------------------------


def bidirectional_rack() -> torch.nn.Module:
    return create_simple_rack(
        2, 1, 32, n_heads=4, attention_mode="bidirectional", vocab_size=VOCAB, seed=0
    ).eval()


def test_unmask_schedule_splits_the_length_evenly() -> None:
    assert unmask_schedule(10, 4) == [3, 3, 2, 2]
    assert unmask_schedule(8, 8) == [1] * 8
    assert unmask_schedule(3, 5) == [1, 1, 1, 0, 0]


def test_unmasking_fills_every_mask_and_keeps_the_prompt() -> None:
    rack = bidirectional_rack()
    prompt = [3, 1, 4, 1, 5]
    forbidden = (56, 57, 58)
    for steps in (1, 4, 12):
        out = rack.generate(
            prompt,
            max_new_tokens=12,
            steps=steps,
            mask_id=MASK_ID,
            forbidden_ids=forbidden,
            temperature=1.0,
            seed=2,
        )
        assert out.sampler == "unmask" and out.steps == steps
        assert out.tokens.shape == (1, 17)
        assert out.tokens[0, :5].tolist() == prompt
        generated = out.tokens[0, 5:].tolist()
        assert MASK_ID not in generated
        assert not set(generated) & set(forbidden)
        again = rack.generate(
            prompt, max_new_tokens=12, steps=steps, mask_id=MASK_ID,
            forbidden_ids=forbidden, temperature=1.0, seed=2,
        )  # fmt: skip
        assert torch.equal(out.tokens, again.tokens)


def test_unmasking_never_fills_in_forbidden_tokens() -> None:
    """Near-uniform draws (temperature 50) over 200 positions would hit each of 4 of the 61 ids
    about 13 times if nothing excluded them."""
    out = bidirectional_rack().generate(
        [1, 2],
        max_new_tokens=200,
        steps=2,
        mask_id=MASK_ID,
        forbidden_ids=(56, 57, 58),
        temperature=50.0,
        seed=0,
    )
    assert not set(out.tokens[0, 2:].tolist()) & {56, 57, 58, MASK_ID}


def test_unmasking_fills_the_most_confident_position_first() -> None:
    """Greedy, one position per step: step 1 fills the position whose best token is the most
    likely of all (computed here from one forward of the all-masked sequence), and a filled
    position never changes."""
    rack = bidirectional_rack()
    prompt = [7, 7, 2]
    sequence = torch.tensor([prompt + [MASK_ID] * 8])
    with torch.no_grad():
        logits = rack(sequence)[0, 3:].clone()
    logits[:, MASK_ID] = -torch.inf
    best_probability, best_token = torch.softmax(logits, dim=-1).max(dim=-1)
    first = int(best_probability.argmax())
    out = rack.generate(prompt, max_new_tokens=8, steps=8, mask_id=MASK_ID, temperature=0.0)
    assert int(out.tokens[0, 3 + first]) == int(best_token[first])
    # Two steps of 4 instead: the four most confident positions of step 1 keep their tokens.
    top4 = best_probability.topk(4).indices
    two_steps = rack.generate(prompt, max_new_tokens=8, steps=2, mask_id=MASK_ID, temperature=0.0)
    assert two_steps.tokens[0, 3 + top4].tolist() == best_token[top4].tolist()


def test_sampler_follows_the_training_objective() -> None:
    causal = causal_rack("mha", {})
    spec = {"d_model": 32, "n_heads": 4, "attention_type": "mha"}
    mixed = create_rack_from_specs(
        VOCAB,
        32,
        [
            {"n_blocks": 1, "block_spec": {**spec, "attention_mode": "causal"}},
            {"n_blocks": 1, "block_spec": {**spec, "attention_mode": "bidirectional"}},
        ],
        seed=0,
    )
    assert sampler_for(causal) == "autoregressive"
    assert sampler_for(causal, "diffusion") == "unmask"
    assert sampler_for(mixed) == "unmask"
    assert sampler_for(mixed, "mlm") == "unmask"
    out = mixed.generate([1, 2], max_new_tokens=6, mask_id=MASK_ID, steps=3)
    assert out.sampler == "unmask" and MASK_ID not in out.tokens[0].tolist()
    with pytest.raises(ValueError, match="unknown objective"):
        sampler_for(causal, "bert")
