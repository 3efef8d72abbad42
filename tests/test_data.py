"""Data: tokenizers, sources, deterministic split, packing and resumable loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from stackwise.config.base import BYTE_VOCAB_SIZE, DataConfig, TrainingConfig
from stackwise.data import (
    BPETokenizer,
    ByteTokenizer,
    SequenceLoader,
    build_data,
    builtin_documents,
    load_documents,
    pack,
    split_and_pack,
)


def _training(**overrides: object) -> TrainingConfig:
    return TrainingConfig(**{"seq_len": 32, "batch_size": 4, **overrides})  # type: ignore[arg-type]


def test_byte_tokenizer_round_trip_and_special_ids() -> None:
    tokenizer = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tokenizer.encode(text)
    assert max(ids) < 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.vocab_size == BYTE_VOCAB_SIZE == 260
    specials = [tokenizer.pad_id, tokenizer.mask_id, tokenizer.bos_id, tokenizer.eos_id]
    assert specials == [256, 257, 258, 259]
    assert tokenizer.decode([*ids, tokenizer.eos_id]) == text


def test_bpe_trains_locally_and_round_trips_through_json(tmp_path: Path) -> None:
    docs = builtin_documents()[:20]
    tokenizer = BPETokenizer.train(docs, vocab_size=400)
    assert tokenizer.vocab_size == 400
    assert [tokenizer.pad_id, tokenizer.mask_id, tokenizer.bos_id, tokenizer.eos_id] == [0, 1, 2, 3]
    text = "The for statement is used to iterate"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    json.loads(path.read_text())  # plain JSON, not a pickle
    again = BPETokenizer.load(path)
    assert again.encode(text) == tokenizer.encode(text)
    assert len(tokenizer.encode(text)) < len(text)  # merges were learned


def test_builtin_corpus_is_pydoc_topics_in_sorted_order() -> None:
    from pydoc_data.topics import topics

    docs = builtin_documents()
    assert docs[0] == topics[sorted(topics)[0]]
    assert sum(len(d) for d in docs) > 100_000


def test_split_is_deterministic_by_document_and_seeded() -> None:
    data = DataConfig(max_tokens=50_000)
    a = build_data(data, _training(seed=1))
    b = build_data(data, _training(seed=1))
    c = build_data(data, _training(seed=2))
    assert torch.equal(a.train_loader.sequences, b.train_loader.sequences)
    assert torch.equal(a.val_loader.sequences, b.val_loader.sequences)
    assert not torch.equal(a.val_loader.sequences, c.val_loader.sequences)
    assert a.train_tokens + a.val_tokens <= 50_000
    assert a.val_tokens > 0 and a.train_tokens > 10 * a.val_tokens


def test_split_keeps_documents_whole() -> None:
    docs = [np.full(40, i, dtype=np.int64) for i in range(20)]
    splits = split_and_pack(docs, val_fraction=0.2, seq_len=8, seed=0, eos_id=99)
    train_docs = set(splits.train.flatten().tolist()) - {99}
    val_docs = set(splits.val.flatten().tolist()) - {99}
    assert train_docs and val_docs and not train_docs & val_docs


def test_single_document_falls_back_to_a_positional_split() -> None:
    docs = [np.arange(1000, dtype=np.int64) % 200]
    splits = split_and_pack(docs, val_fraction=0.1, seq_len=10, seed=0, eos_id=255)
    assert len(splits.train) == 90 and len(splits.val) == 10


def test_packing_separates_documents_with_eos() -> None:
    rows = pack([np.array([1, 2, 3]), np.array([4, 5])], seq_len=3, eos_id=9)
    assert rows.tolist() == [[1, 2, 3], [9, 4, 5]]  # the trailing EOS is the dropped tail


def test_max_tokens_limits_the_corpus() -> None:
    bundle = build_data(DataConfig(max_tokens=5_000), _training())
    assert bundle.train_tokens + bundle.val_tokens <= 5_000


def test_text_files_and_globs(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.md").write_text("deep text " * 50)
    data = DataConfig(source="files", paths=[str(tmp_path / "*.txt"), str(tmp_path / "**/*.md")])
    docs = load_documents(data)
    assert len(docs) == 5 and docs[0].startswith("document number 0")
    bundle = build_data(data, _training(seq_len=16))
    assert bundle.train_tokens > 0 and bundle.val_tokens > 0


def test_jsonl_and_parquet_sources(tmp_path: Path) -> None:
    rows = [{"body": f"row {i} " * 30, "id": i} for i in range(10)] + [{"body": None, "id": 99}]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    parquet = tmp_path / "data.parquet"
    pl.DataFrame(rows).write_parquet(parquet)
    for path in (jsonl, parquet):
        docs = load_documents(DataConfig(source="files", paths=[str(path)], text_column="body"))
        assert len(docs) == 10 and docs[3].startswith("row 3")
    with pytest.raises(ValueError, match=r"data\.text_column"):
        load_documents(DataConfig(source="files", paths=[str(parquet)], text_column="text"))


def test_missing_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.paths"):
        load_documents(DataConfig(source="files", paths=[str(tmp_path / "*.txt")]))
    with pytest.raises(FileNotFoundError, match=r"data\.paths"):
        load_documents(DataConfig(source="files", paths=[str(tmp_path / "nope.txt")]))


def test_bpe_data_bundle() -> None:
    bundle = build_data(
        DataConfig(tokenizer="bpe", bpe_vocab_size=320, max_tokens=20_000), _training()
    )
    assert bundle.tokenizer.vocab_size == 320
    assert int(bundle.train_loader.sequences.max()) < 320


def test_loader_order_is_seeded_per_epoch_and_resumable() -> None:
    sequences = torch.arange(40).view(20, 2)
    loader = SequenceLoader(sequences, 3, shuffle=True, seed=7)
    assert len(loader) == 6
    epoch0 = [b.clone() for b in loader]
    epoch1 = [b.clone() for b in loader]
    assert loader.state_dict() == {"epoch": 2, "index": 0}
    assert not all(torch.equal(x, y) for x, y in zip(epoch0, epoch1, strict=True))
    again = SequenceLoader(sequences, 3, shuffle=True, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(again.iter_epoch(0), epoch0, strict=True))
    resumed = list(again.iter_epoch(1, start=4))
    assert all(torch.equal(x, y) for x, y in zip(resumed, epoch1[4:], strict=True))
    # Partway through an epoch, iteration continues where the state says.
    partial = SequenceLoader(sequences, 3, shuffle=True, seed=7)
    partial.load_state_dict({"epoch": 1, "index": 2})
    assert torch.equal(next(iter(partial)), epoch1[2])


def test_validation_loader_is_unshuffled_and_complete() -> None:
    loader = SequenceLoader(torch.arange(10).view(5, 2), 2, shuffle=False, drop_last=False)
    assert [b[:, 0].tolist() for b in loader] == [[0, 2], [4, 6], [8]]
