"""Export: Hugging Face Llama folders (same logits, same greedy continuation, same token ids),
StackWise safetensors folders, and the racks that cannot be exported (tiny racks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stackwise.data.tokenizer import BPETokenizer, ByteTokenizer
from stackwise.model import create_rack_from_specs, create_simple_rack
from stackwise.tracking.export import (
    ExportError,
    byte_tokenizer_json,
    export_hf,
    export_safetensors,
    hf_incompatibility,
)
from stackwise.tracking.models import TrainedModel, load_rack, load_trained

transformers = pytest.importorskip("transformers")

TEXT = "Hello, wörld! Ünïcode · 日本語 — tabs\tand\nnewlines; [MASK] stays bytes 🙂"


def llama_like_rack(tie: bool, vocab_size: int = 260, theta: float = 500.0) -> torch.nn.Module:
    rack = create_simple_rack(
        2,
        1,
        32,
        n_heads=4,
        n_kv_heads=2,
        attention_type="gqa",
        attention_mode="causal",
        vocab_size=vocab_size,
        tie_embeddings=tie,
        rope_theta=theta,
        seed=0,
    ).eval()
    with torch.no_grad():  # weights far from init, so every mapped tensor matters
        generator = torch.Generator().manual_seed(1)
        for parameter in rack.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return rack


def trained(rack: torch.nn.Module, tokenizer=None, tokenizer_json=None) -> TrainedModel:
    return TrainedModel(
        rack=rack,
        tokenizer=tokenizer or ByteTokenizer(),
        objective="clm",
        name="tiny",
        source="tiny",
        tokenizer_json=tokenizer_json,
        seq_len=64,
    )


def load_llama(folder: Path) -> torch.nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_hf_export_gives_the_racks_logits_and_greedy_continuation(
    tmp_path: Path, tie: bool
) -> None:
    rack = llama_like_rack(tie)
    if not tie:
        assert not torch.equal(rack.lm_head.weight, rack.token_embedding.weight)
    written = export_hf(trained(rack), tmp_path / "llama")
    assert {p.name for p in written} >= {"config.json", "model.safetensors", "tokenizer.json"}
    llama = load_llama(tmp_path / "llama")
    assert llama.config.tie_word_embeddings == tie
    ids = torch.randint(0, 260, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = rack(ids)
        got = llama(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    prompt = ids[:1, :6]
    ours = rack.generate(prompt, max_new_tokens=16, temperature=0.0)
    theirs = llama.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=None,
    )
    assert theirs.tolist() == ours.tokens.tolist()


def test_byte_tokenizer_json_encodes_to_the_byte_tokenizers_ids(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    ours = ByteTokenizer()
    tokenizer = Tokenizer.from_str(byte_tokenizer_json())
    expected = list(TEXT.encode("utf-8"))  # independent: the UTF-8 bytes themselves
    tokenizer.encode_special_tokens = True  # what the exported folder's config asks for
    assert tokenizer.encode(TEXT).ids == expected == ours.encode(TEXT)
    assert tokenizer.decode(expected) == TEXT
    assert [tokenizer.token_to_id(t) for t in ("[PAD]", "[MASK]", "[BOS]", "[EOS]")] == [
        ours.pad_id,
        ours.mask_id,
        ours.bos_id,
        ours.eos_id,
    ]
    # The exported folder's tokenizer, loaded the Hugging Face way, says the same.
    export_hf(trained(llama_like_rack(True)), tmp_path / "llama")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "llama")
    assert auto(TEXT, add_special_tokens=False)["input_ids"] == expected
    assert auto.decode([*expected, ours.eos_id]) == TEXT + "[EOS]"
    assert auto.eos_token_id == ours.eos_id and auto.pad_token_id == ours.pad_id


def test_hf_export_of_a_bpe_run_keeps_its_tokenizer(tmp_path: Path) -> None:
    bpe = BPETokenizer.train([TEXT * 3, "the quick brown fox jumps over the lazy dog"] * 20, 300)
    rack = llama_like_rack(False, vocab_size=bpe.vocab_size)
    export_hf(trained(rack, bpe, bpe.to_json()), tmp_path / "llama")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "llama")
    sample = "the lazy fox, wörld"
    assert auto(sample, add_special_tokens=False)["input_ids"] == bpe.encode(sample)
    assert auto.eos_token_id == bpe.eos_id
    llama = load_llama(tmp_path / "llama")
    ids = torch.tensor([bpe.encode(sample)])
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=ids).logits, rack(ids), atol=1e-4, rtol=0)


def _spec(**options: object) -> dict:
    return {"d_model": 32, "n_heads": 4, "attention_mode": "causal", **options}


@pytest.mark.parametrize(
    ("stacks", "message"),
    [
        ([_spec(attention_type="mla")], r"block 0 \(stack 0, block 0\): attention_type mla"),
        (
            [_spec(), _spec(attention_type="kernel")],
            r"block 1 \(stack 1, block 0\): attention_type kernel",
        ),
        ([_spec(), _spec(attention_mode="bidirectional")], "attention_mode bidirectional"),
        ([_spec(use_rope=False)], "use_rope false"),
        ([_spec(), _spec(d_ff=48)], r"block 1 .*: d_ff 48 differs from block 0's"),
        ([_spec(), _spec(n_kv_heads=2)], "n_kv_heads 2 differs"),
        ([_spec(), _spec(norm_eps=1e-6)], "norm_eps 1e-06 differs"),
    ],
)
def test_hf_export_refuses_what_llama_cannot_express(
    tmp_path: Path, stacks: list[dict], message: str
) -> None:
    rack = create_rack_from_specs(
        260, 32, [{"n_blocks": 1, "block_spec": s} for s in stacks], seed=0
    )
    problem = hf_incompatibility(rack)
    assert problem is not None and "\n" not in problem
    with pytest.raises(ExportError, match=message):
        export_hf(trained(rack), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_folder_with_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_safetensors(trained(llama_like_rack(True)), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_safetensors_export_loads_with_load_rack(tmp_path: Path) -> None:
    spec = {"d_model": 32, "n_heads": 4, "attention_type": "mla", "kv_lora_rank": 8}
    rack = create_rack_from_specs(
        260,
        32,
        [
            {"n_blocks": 1, "block_spec": {**spec, "attention_mode": "causal"}},
            {"n_blocks": 1, "block_spec": {**spec, "attention_mode": "bidirectional"}},
        ],
        tie_embeddings=False,
        seed=3,
    ).eval()
    model = trained(rack)
    model.objective, model.config_yaml = "diffusion", "training:\n  objective: diffusion\n"
    written = export_safetensors(model, tmp_path / "saved")
    assert {p.name for p in written} == {"weights.safetensors", "rack_spec.json", "config.yaml"}
    loaded = load_rack(str(tmp_path / "saved"))
    assert loaded.spec() == rack.spec()
    ids = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), rack(ids))
    again = load_trained(str(tmp_path / "saved"))
    assert again.objective == "diffusion"
    assert isinstance(again.tokenizer, ByteTokenizer)
