"""Block / Stack / Rack: structure, counts, init, freezing, tying, slicing, specs and persistence."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_model, save_model
from torch.utils.flop_counter import FlopCounterMode

from stackwise.config.base import StackWiseConfig
from stackwise.model import (
    Block,
    Rack,
    Stack,
    create_block_spec,
    create_rack_from_config,
    create_rack_from_specs,
    create_simple_rack,
    create_stack_from_spec,
    default_d_ff,
    default_n_heads,
)

VOCAB = 53


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def small_rack(**kwargs) -> Rack:
    options = {
        "n_stacks": 2,
        "blocks_per_stack": 2,
        "d_model": 32,
        "n_heads": 4,
        "vocab_size": VOCAB,
        "attention_mode": "causal",
        "seed": 0,
    }
    options.update(kwargs)
    return create_simple_rack(**options)


# -- defaults and specs -----------------------------------------------------------------------


def test_default_heads_and_ffn_width() -> None:
    assert default_n_heads(512) == 8
    assert default_n_heads(32) == 1
    assert default_n_heads(96) == 1
    assert default_n_heads(4096) == 64
    assert default_d_ff(512) == 1368  # ceil(8/3 * 512) to a multiple of 8
    assert default_d_ff(256) == 688
    assert default_d_ff(4096) == 11008  # Llama-7B: multiple of 256
    spec = create_block_spec(d_model=256, attention_mode="causal")
    assert (spec["n_heads"], spec["n_kv_heads"], spec["d_ff"]) == (4, 4, 688)


def test_block_spec_validation() -> None:
    with pytest.raises(ValueError, match="divisible by n_heads"):
        create_block_spec(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="divisible by n_kv_heads"):
        create_block_spec(d_model=32, n_heads=4, n_kv_heads=3, attention_type="gqa")
    with pytest.raises(ValueError, match="attention_type"):
        create_block_spec(d_model=32, attention_type="softmax")
    with pytest.raises(ValueError, match="attention_mode"):
        create_block_spec(d_model=32, attention_mode="encoder")
    with pytest.raises(ValueError, match="mla"):
        create_block_spec(d_model=32, attention_type="mla", n_kv_heads=2)
    mla = create_block_spec(d_model=64, n_heads=4, attention_type="mla")
    assert (mla["kv_lora_rank"], mla["qk_rope_head_dim"], mla["n_kv_heads"]) == (16, 8, None)
    favor = {"attention_type": "kernel", "kernel_feature_map": "favor"}
    with pytest.raises(ValueError, match="kernel_n_features must be even"):
        create_block_spec(d_model=32, n_heads=4, kernel_n_features=15, **favor)
    with pytest.raises(ValueError, match="kernel_redraw_every"):
        create_block_spec(d_model=32, n_heads=4, kernel_redraw_every=0, **favor)
    model = {"d_model": 32, "n_heads": 4, "attention_type": "kernel"}
    with pytest.raises(ValueError, match=r"kernel\.n_features: RoPE"):
        StackWiseConfig.from_dict(
            {"model": {**model, "kernel": {"feature_map": "favor", "n_features": 15}}}
        )
    no_rope = {**model, "use_rope": False, "kernel": {"feature_map": "favor", "n_features": 15}}
    assert StackWiseConfig.from_dict({"model": no_rope}).model.kernel.n_features == 15


def test_block_exposes_mode_type_and_spec() -> None:
    block = Block(
        d_model=32, n_heads=4, n_kv_heads=2, attention_type="gqa", attention_mode="causal"
    )
    assert block.attention_type == "gqa" and block.attention_mode == "causal" and block.is_causal
    rebuilt = Block(**block.spec())
    rebuilt.load_state_dict(block.state_dict())
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(rebuilt(h), block(h), rtol=0, atol=0)
    assert json.loads(json.dumps(block.spec())) == block.spec()


# -- parameter counts -------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_count_closed_form_mha(tie: bool) -> None:
    d, f, layers, vocab = 48, 96, 5, 70
    rack = create_simple_rack(
        n_stacks=1, blocks_per_stack=layers, d_model=d, d_ff=f, n_heads=6, vocab_size=vocab,
        tie_embeddings=tie,
    )  # fmt: skip
    per_block = 4 * d * d + 3 * d * f + 2 * d  # q,k,v,o + gate,up,down + two RMSNorm weights
    expected = vocab * d * (1 if tie else 2) + layers * per_block + d
    assert rack.get_parameter_count() == expected
    assert rack.get_parameter_count(trainable_only=True) == expected


def test_parameter_count_gqa_and_trainable_only() -> None:
    d, f, n_heads, n_kv = 32, 64, 4, 2
    kv_width = n_kv * (d // n_heads)
    spec = create_block_spec(
        d_model=d, d_ff=f, n_heads=n_heads, n_kv_heads=n_kv, attention_type="gqa",
        freeze_up_proj=True,
    )  # fmt: skip
    rack = create_rack_from_specs(
        VOCAB,
        d,
        [
            {"stack_id": 0, "n_blocks": 2, "block_spec": spec},
            {"stack_id": 1, "n_blocks": 1, "block_spec": spec, "freeze_blocks": True},
        ],
    )
    per_block = 2 * d * d + 2 * d * kv_width + 3 * d * f + 2 * d
    total = VOCAB * d + 3 * per_block + d
    assert rack.get_parameter_count() == total
    # trainable: the frozen stack contributes nothing, the others lose their up projections
    assert rack.get_parameter_count(trainable_only=True) == total - per_block - 2 * d * f


# -- initialisation ---------------------------------------------------------------------------


def test_seeded_init_is_reproducible_and_ignores_global_rng() -> None:
    torch.manual_seed(1)
    a = small_rack(seed=7)
    torch.manual_seed(2)
    b = small_rack(seed=7)
    c = small_rack(seed=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.token_embedding.weight, c.token_embedding.weight)


def test_init_scales_residual_projections_by_depth() -> None:
    layers = 8
    rack = create_simple_rack(
        n_stacks=2, blocks_per_stack=4, d_model=128, d_ff=512, n_heads=4, vocab_size=500, seed=0
    )
    residual = torch.cat(
        [
            torch.cat((b.attn.o_proj.weight.flatten(), b.ffn.down_proj.weight.flatten()))
            for b in rack.blocks
        ]
    )
    other = torch.cat([b.ffn.gate_proj.weight.flatten() for b in rack.blocks])
    assert abs(other.std().item() - 0.02) < 0.001
    assert abs(residual.std().item() - 0.02 / math.sqrt(2 * layers)) < 0.0005
    assert abs(rack.token_embedding.weight.std().item() - 0.02) < 0.001
    assert torch.equal(rack.norm.weight, torch.ones(128))


# -- freezing and tying -----------------------------------------------------------------------


def test_frozen_up_projection_never_changes_but_is_saved() -> None:
    rack = small_rack(freeze_up_proj=True)
    up_before = [b.ffn.up_proj.weight.detach().clone() for b in rack.blocks]
    gate_before = rack.blocks[0].ffn.gate_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW(rack.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        logits = rack(ids(seed=step))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids(seed=step).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for block, before in zip(rack.blocks, up_before, strict=True):
        assert block.ffn.up_proj.weight.grad is None
        assert torch.equal(block.ffn.up_proj.weight, before)
    assert not torch.equal(rack.blocks[0].ffn.gate_proj.weight, gate_before)
    assert "stacks.0.blocks.0.ffn.up_proj.weight" in rack.state_dict()
    # unfreezing a stack or the rack keeps the up projection frozen
    rack.stacks[0].freeze()
    rack.stacks[0].unfreeze()
    rack.unfreeze()
    assert not any(b.ffn.up_proj.weight.requires_grad for b in rack.blocks)


def test_stack_freeze_unfreeze() -> None:
    stack = create_stack_from_spec(0, 2, create_block_spec(d_model=32), freeze_blocks=True)
    assert stack.is_frozen and stack.freeze_blocks
    stack.unfreeze()
    assert not stack.is_frozen
    assert all(p.requires_grad for p in stack.parameters())
    stack.freeze()
    assert stack.is_frozen
    assert stack.spec()["freeze_blocks"] is True


def test_rack_unfreeze_keeps_declared_frozen_stacks() -> None:
    spec = create_block_spec(d_model=32)
    rack = create_rack_from_specs(
        VOCAB,
        32,
        [
            {"n_blocks": 1, "block_spec": spec, "freeze_blocks": True},
            {"n_blocks": 1, "block_spec": spec},
        ],
    )
    rack.freeze()
    assert rack.get_parameter_count(trainable_only=True) == 0
    rack.unfreeze()
    assert rack.stacks[0].is_frozen and not rack.stacks[1].is_frozen
    assert rack.token_embedding.weight.requires_grad


def test_tied_embeddings_share_storage() -> None:
    rack = small_rack()
    assert rack.lm_head.weight is rack.token_embedding.weight
    assert rack.lm_head.weight.data_ptr() == rack.token_embedding.weight.data_ptr()
    assert all(p is not rack.token_embedding.weight for p in rack.readout_parameters())
    assert [p.shape for p in rack.readout_parameters()] == [torch.Size([32])]
    untied = small_rack(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.token_embedding.weight.data_ptr()
    assert any(p is untied.lm_head.weight for p in untied.readout_parameters())


# -- persistence and specs --------------------------------------------------------------------


@pytest.mark.parametrize("attention_type", ["mha", "gqa", "mla", "kernel"])
def test_state_dict_round_trip_reproduces_logits(attention_type: str, tmp_path) -> None:
    options = {"n_kv_heads": 2} if attention_type == "gqa" else {}
    if attention_type == "kernel":
        options = {"kernel_feature_map": "favor", "kernel_seed": 4}
    rack = small_rack(attention_type=attention_type, seed=1, **options).eval()
    spec = json.loads(json.dumps(rack.spec()))
    spec["seed"] = 99  # different init: weights must come from the state dict
    clone = create_rack_from_specs(**spec).eval()
    clone.load_state_dict(rack.state_dict())
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), rack(x), rtol=0, atol=0)

    path = tmp_path / "rack.safetensors"
    save_model(rack, str(path))
    restored = Rack.from_spec(spec).eval()
    load_model(restored, str(path))
    assert restored.lm_head.weight is restored.token_embedding.weight
    with torch.no_grad():
        torch.testing.assert_close(restored(x), rack(x), rtol=0, atol=0)


def test_saved_spec_without_favor_sampling_loads_the_draw_it_was_saved_with(tmp_path) -> None:
    """A rack saved before the FAVOR+ draw could be chosen has no ``kernel_favor_sampling`` in
    its spec; it drew orthogonal features, so it loads as orthogonal (its redraws stay the
    same), while a current spec keeps what it says."""
    from stackwise.tracking.models import rack_from_files

    rack = small_rack(attention_type="kernel", kernel_feature_map="favor", seed=1).eval()
    assert {b.attn.sampling for b in rack.blocks} == {"regularized"}
    save_model(rack, str(tmp_path / "rack.safetensors"))
    current = json.loads(json.dumps(rack.spec()))
    old = json.loads(json.dumps(current))
    for stack in old["stack_specs"]:
        for block in stack.get("block_specs") or [stack["block_spec"]]:
            del block["kernel_favor_sampling"]
    for name, spec, sampling in (("current", current, "regularized"), ("old", old, "orthogonal")):
        (tmp_path / f"{name}.json").write_text(json.dumps(spec))
        loaded = rack_from_files(tmp_path / "rack.safetensors", tmp_path / f"{name}.json")
        assert {b.attn.sampling for b in loaded.blocks} == {sampling}
        with torch.no_grad():  # the saved projection is what computes, whatever the draw
            torch.testing.assert_close(loaded(ids()), rack(ids()), rtol=0, atol=0)


def test_spec_round_trip_rebuilds_the_same_architecture() -> None:
    encoder = create_block_spec(d_model=32, n_heads=4, attention_type="mla", q_lora_rank=8)
    decoder = create_block_spec(
        d_model=32, n_heads=4, n_kv_heads=1, attention_type="gqa", attention_mode="causal"
    )
    rack = create_rack_from_specs(
        VOCAB,
        32,
        [
            {"stack_id": 0, "n_blocks": 1, "block_spec": encoder, "freeze_blocks": True},
            {"stack_id": 1, "n_blocks": 2, "block_spec": decoder},
        ],
        tie_embeddings=False,
        seed=3,
    )
    spec = rack.spec()
    rebuilt = create_rack_from_specs(**json.loads(json.dumps(spec)))
    assert rebuilt.spec() == spec
    assert rebuilt.get_parameter_count() == rack.get_parameter_count()
    assert rebuilt.get_parameter_count(trainable_only=True) == rack.get_parameter_count(
        trainable_only=True
    )
    rebuilt.load_state_dict(rack.state_dict(), strict=True)
    # the seed is part of the spec: the rebuilt rack has the same initial weights
    for a, b in zip(rack.parameters(), create_rack_from_specs(**spec).parameters(), strict=True):
        assert torch.equal(a, b)


def test_stack_of_differing_blocks_round_trips() -> None:
    blocks = [
        Block(d_model=32, attention_mode="causal"),
        Block(d_model=32, attention_type="kernel"),
    ]
    rack = Rack([Stack(blocks, stack_id=0)], vocab_size=VOCAB, d_model=32, seed=0)
    spec = rack.spec()
    assert "block_specs" in spec["stack_specs"][0]
    rebuilt = create_rack_from_specs(**spec)
    assert [b.attention_type for b in rebuilt.blocks] == ["mha", "kernel"]
    rebuilt.load_state_dict(rack.state_dict())


def test_block_width_must_match_rack() -> None:
    with pytest.raises(ValueError, match="d_model"):
        Rack([Stack([Block(d_model=16)], 0)], vocab_size=VOCAB, d_model=32)
    with pytest.raises(ValueError, match="unknown keys"):
        create_rack_from_specs(VOCAB, 32, [{"n_blocks": 1, "block_spec": {}, "frozen": True}])


# -- slicing and mixed racks ------------------------------------------------------------------


def test_slices_compose_to_the_full_forward() -> None:
    rack = small_rack(attention_type="gqa", n_kv_heads=2).eval()
    x = ids()
    mask = torch.ones_like(x)
    mask[1, 9:] = 0
    with torch.no_grad():
        for k in range(rack.n_blocks + 1):
            h = rack.forward_blocks(rack.embed(x), 0, k, mask)
            logits = rack.readout(rack.forward_blocks(h, k, rack.n_blocks, mask))
            torch.testing.assert_close(logits, rack(x, mask), rtol=0, atol=0)
    assert rack.n_blocks == 4 and len(rack.blocks) == 4
    with pytest.raises(ValueError):
        rack.forward_blocks(rack.embed(x), 2, 5)


def test_mixed_rack_behaves_per_stack() -> None:
    encoder = create_block_spec(d_model=32, attention_mode="bidirectional")
    decoder = create_block_spec(d_model=32, attention_mode="causal")
    rack = create_rack_from_specs(
        VOCAB,
        32,
        [
            {"stack_id": 0, "n_blocks": 2, "block_spec": encoder},
            {"stack_id": 1, "n_blocks": 2, "block_spec": decoder},
        ],
        seed=0,
    ).eval()
    assert [b.attention_mode for b in rack.blocks] == ["bidirectional"] * 2 + ["causal"] * 2
    assert not rack.is_causal
    x = ids()
    changed = x.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % VOCAB
    with torch.no_grad():
        h, h_changed = rack.embed(x), rack.embed(changed)
        enc, enc_changed = rack.stacks[0](h), rack.stacks[0](h_changed)
        # the encoder stack sees the future ...
        assert (enc[:, :8] - enc_changed[:, :8]).abs().max() > 1e-4
        # ... the decoder stack does not: with the same past, its past outputs are unchanged
        mixed = torch.cat((enc[:, :8], enc_changed[:, 8:]), dim=1)
        torch.testing.assert_close(
            rack.stacks[1](mixed)[:, :8], rack.stacks[1](enc)[:, :8], rtol=0, atol=1e-6
        )
        # so the whole rack is not causal
        assert (rack(x)[:, :8] - rack(changed)[:, :8]).abs().max() > 1e-4


# -- FLOPs ------------------------------------------------------------------------------------


def test_flops_per_token_formula() -> None:
    """A hand count for d_model 32, 4 heads, SwiGLU width 64, 3 blocks, 53 tokens, context 16."""
    rack = create_simple_rack(
        n_stacks=1, blocks_per_stack=3, d_model=32, d_ff=64, n_heads=4, vocab_size=VOCAB
    )
    # per block: qkv 32x96 = 3072, o_proj 32x32 = 1024, gate/up/down 3 x 32x64 = 6144 weights;
    # the tied LM head 53x32 = 1696 once (the embedding lookup is free): 3 x 10240 + 1696
    weights = 32416
    # per block and token: QKᵀ over 16 keys x 32 channels and AV the same, 2 FLOPs per mul-add
    attention = 3 * (2 * 16 * 32 + 2 * 16 * 32)
    assert rack.flops_per_token(16) == 2 * weights + attention == 70976
    mfu = rack.estimate_mfu(tokens_per_iter=1000, n_ctx=16, dt=1.0, peak_flops=1e9)
    assert mfu == pytest.approx(3 * 70976 * 1000 / 1e9)
    # the weight part is what the forward's matrix products really cost
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        rack(ids(batch=1, length=16))
    assert counter.get_total_flops() == 16 * 2 * weights


# -- building from the run config -------------------------------------------------------------


def test_rack_from_config_uses_architecture_section() -> None:
    config = StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": 32,
                "n_heads": 4,
                "n_kv_heads": 2,
                "attention_type": "gqa",
                "d_ff": 80,
                "architecture": {"n_stacks": 3, "blocks_per_stack": 2},
            },
            "training": {"seed": 5},
        }
    )
    rack = create_rack_from_config(config.to_dict())
    assert [len(s.blocks) for s in rack.stacks] == [2, 2, 2]
    assert rack.vocab_size == 260  # the byte tokenizer, as vocab_size is null
    assert rack.seed == 5
    block = rack.blocks[0].spec()
    assert (block["n_kv_heads"], block["d_ff"], block["attention_mode"]) == (2, 80, "causal")
    same = create_rack_from_config(config)  # the config object works too
    assert torch.equal(same.token_embedding.weight, rack.token_embedding.weight)


def test_rack_from_config_honours_every_field() -> None:
    model = {
        "vocab_size": 97,
        "d_model": 32,
        "n_heads": 4,
        "d_ff": 64,
        "attention_type": "mla",
        "attention_mode": "bidirectional",
        "dropout": 0.1,
        "use_rope": False,
        "rope_theta": 500.0,
        "norm_eps": 1e-6,
        "tie_embeddings": False,
        "freeze_up_proj": True,
        "init_std": 0.05,
        "mla": {"kv_lora_rank": 12, "q_lora_rank": 10, "rope_head_dim": 4},
        "kernel": {
            "feature_map": "favor",
            "n_features": 20,
            "chunk_size": 8,
            "seed": 3,
            "redraw_every": 5,
        },
        "stacks": [
            {"n_blocks": 1},
            {
                "n_blocks": 2,
                "attention_type": "kernel",
                "attention_mode": "causal",
                "n_heads": 2,
                "n_kv_heads": 1,
                "d_ff": 48,
                "dropout": 0.0,
                "freeze_up_proj": False,
                "freeze_blocks": True,
            },
        ],
    }
    config = StackWiseConfig.from_dict({"model": model, "training": {"objective": "mlm"}})
    rack = create_rack_from_config(config.to_dict(), seed=11)
    assert rack.seed == 11
    assert (rack.vocab_size, rack.tie_embeddings, rack.init_std, rack.norm_eps) == (
        97,
        False,
        0.05,
        1e-6,
    )
    first = rack.blocks[0].spec()
    assert first["attention_type"] == "mla" and first["attention_mode"] == "bidirectional"
    assert (first["kv_lora_rank"], first["q_lora_rank"], first["qk_rope_head_dim"]) == (12, 10, 4)
    assert first["dropout"] == 0.1 and first["freeze_up_proj"] is True
    assert first["use_rope"] is False and first["rope_theta"] == 500.0 and first["d_ff"] == 64
    assert rack.blocks[0].attn.rotary is None
    second = rack.blocks[1].spec()
    assert second["attention_type"] == "kernel" and second["attention_mode"] == "causal"
    assert (second["n_heads"], second["n_kv_heads"], second["d_ff"]) == (2, 1, 48)
    assert second["dropout"] == 0.0 and second["freeze_up_proj"] is False
    assert (second["kernel_feature_map"], second["kernel_n_features"]) == ("favor", 20)
    assert (second["kernel_chunk_size"], second["kernel_seed"]) == (8, 3)
    assert second["kernel_redraw_every"] == 5 and rack.blocks[1].attn.redraw_every == 5
    assert not rack.stacks[0].is_frozen and rack.stacks[1].is_frozen
    assert rack.blocks[0].ffn.up_proj.weight.requires_grad is False
    assert rack.token_embedding.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert rack(ids(length=9)).shape == (2, 9, 97)


def test_rack_from_model_section_only() -> None:
    rack = create_rack_from_config({"d_model": 32, "n_heads": 2, "architecture": {"n_stacks": 1}})
    assert rack.n_blocks == 4 and rack.is_causal


def test_rms_norm_matches_torch_and_passes_gradcheck() -> None:
    from stackwise.model.norm import RMSNorm, _RMSNormFunction

    torch.manual_seed(0)
    ours, reference = RMSNorm(6, eps=1e-5).double(), torch.nn.RMSNorm(6, eps=1e-5).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        reference.weight.copy_(ours.weight)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ours(x), reference(x))
    grads_ours = torch.autograd.grad(ours(x).pow(2).sum(), (x, ours.weight))
    grads_reference = torch.autograd.grad(reference(x).pow(2).sum(), (x, reference.weight))
    torch.testing.assert_close(grads_ours, grads_reference)
    weight = ours.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), (x, weight))


def test_a_racks_blocks_share_one_rotation_table_per_shape() -> None:
    """Every block's RoPE reads one table per head width (not one per block, which grows with
    depth), also a block put in later; outputs are those of blocks with their own tables."""
    from stackwise.model.attention import RotaryEmbedding
    from stackwise.model.materialize import replace_block

    config = StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": 32,
                "n_heads": 2,
                "vocab_size": 64,
                "stacks": [{"n_blocks": 3}, {"n_blocks": 2, "n_heads": 4}],
            }
        }
    )
    rack = create_rack_from_config(config)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    shared = rack(ids)
    tables = {
        t.untyped_storage().data_ptr()
        for m in rack.modules()
        if isinstance(m, RotaryEmbedding)
        for t in m._cache.values()
    }
    assert len(tables) == 2  # head widths 16 and 8
    # The same rack with a table per block (as each block alone would have it).
    for m in rack.modules():
        if isinstance(m, RotaryEmbedding):
            m.share_tables({})
    assert torch.equal(rack(ids), shared)
    fresh = copy.deepcopy(rack.blocks[1])
    fresh.apply(lambda m: m.share_tables({}) if isinstance(m, RotaryEmbedding) else None)
    rack.share_rotary_tables(rack)
    replace_block(rack, 1, fresh)
    rotaries = [m for m in rack.modules() if isinstance(m, RotaryEmbedding)]
    assert all(m._cache is rotaries[0]._cache for m in rotaries)


@pytest.mark.parametrize("attention_type", ["gqa", "mla", "kernel"])
def test_a_rack_compiles_into_one_graph_that_gives_the_eager_output(attention_type: str) -> None:
    """`training.compile` gets the whole forward in one graph (a break splits it into pieces
    the compiler optimises apart), and the same output as eager, up to float rounding."""
    import torch._dynamo

    torch._dynamo.reset()
    rack = create_simple_rack(
        n_stacks=1,
        blocks_per_stack=2,
        d_model=64,
        n_heads=4,
        attention_type=attention_type,
        attention_mode="causal",
        vocab_size=50,
        seed=0,
    )
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(rack)(ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(rack, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), rack(ids), rtol=1e-5, atol=1e-5)
