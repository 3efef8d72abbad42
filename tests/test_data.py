"""Data: tokenizers, sources, deterministic split, packing and resumable loaders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def test_split_is_deterministic_by_document_and_seeded_by_the_split_seed() -> None:
    data = DataConfig(max_tokens=50_000)
    a = build_data(data, _training(seed=1))
    b = build_data(data, _training(seed=1))
    c = build_data(DataConfig(max_tokens=50_000, split_seed=2), _training(seed=1))
    other_seed = build_data(data, _training(seed=2))
    assert torch.equal(a.train_loader.sequences, b.train_loader.sequences)
    assert torch.equal(a.val_loader.sequences, b.val_loader.sequences)
    assert not torch.equal(a.val_loader.sequences, c.val_loader.sequences)
    # Replicate seeds (training.seed) share one split: same sequences on every side.
    assert torch.equal(a.train_loader.sequences, other_seed.train_loader.sequences)
    assert torch.equal(a.val_loader.sequences, other_seed.val_loader.sequences)
    assert a.test_loader is not None and other_seed.test_loader is not None
    assert torch.equal(a.test_loader.sequences, other_seed.test_loader.sequences)
    assert a.train_tokens + a.val_tokens + a.test_tokens <= 50_000
    assert a.val_tokens > 0 and a.test_tokens > 0 and a.train_tokens > a.val_tokens + a.test_tokens


def test_test_split_holds_whole_documents_that_never_reach_training() -> None:
    # Every document is its own token id: a test document's id must not occur in any batch the
    # training loader yields, nor on the validation side.
    docs = [np.full(30 + i % 7, i, dtype=np.int64) for i in range(200)]
    splits = split_and_pack(
        docs, val_fraction=0.1, test_fraction=0.1, seq_len=8, seed=3, eos_id=999
    )
    assert splits.test is not None
    test_ids = set(splits.test.flatten().tolist()) - {999}
    val_ids = set(splits.val.flatten().tolist()) - {999}
    loader = SequenceLoader(splits.train, 4, shuffle=True, seed=0, drop_last=True)
    seen = {
        int(t) for epoch in range(2) for batch in loader.iter_epoch(epoch) for t in batch.flatten()
    }
    assert test_ids and val_ids
    assert not test_ids & seen and not test_ids & val_ids and not val_ids & seen
    # about a tenth of the tokens each (whole documents: a document more at most)
    total = sum(len(d) + 1 for d in docs)
    assert 0.1 * total <= splits.test.numel() + 8 <= 0.1 * total + 45


def test_test_split_through_build_data_never_reaches_training_batches() -> None:
    # The real corpus: no test sequence appears in any training batch, and no training row
    # shares an 32-byte window with a test row (documents are whole on one side).
    bundle = build_data(DataConfig(max_tokens=60_000), _training(seed=0))
    assert bundle.test_loader is not None
    test_rows = {tuple(row.tolist()) for row in bundle.test_loader.sequences}
    train_rows = {tuple(row.tolist()) for batch in bundle.train_loader for row in batch}
    assert test_rows and not test_rows & train_rows


def test_positional_split_puts_test_after_validation() -> None:
    docs = [np.arange(1000, dtype=np.int64) % 200]
    splits = split_and_pack(
        docs, val_fraction=0.1, test_fraction=0.05, seq_len=10, seed=0, eos_id=255
    )
    assert splits.test is not None
    assert (len(splits.train), len(splits.val), len(splits.test)) == (85, 10, 5)
    stream = np.concatenate([np.arange(1000) % 200, [255]])[:1000]
    assert splits.test.flatten().tolist() == stream[950:1000].tolist()
    assert splits.val.flatten().tolist() == stream[850:950].tolist()


def test_no_test_split_when_its_fraction_is_zero() -> None:
    bundle = build_data(DataConfig(max_tokens=20_000, test_fraction=0.0), _training())
    assert bundle.test_loader is None and bundle.test_tokens == 0


def test_stdlib_corpus_is_builtin_text_then_library_sources() -> None:
    import sysconfig

    from stackwise.data.sources import stdlib_documents, stdlib_files

    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    names = [f.relative_to(root).as_posix() for f in files]
    assert names == sorted(names) and "os.py" in names and "json/decoder.py" in names
    assert not any(
        part in ("test", "idlelib", "site-packages") for n in names for part in n.split("/")
    )
    documents = stdlib_documents()
    assert documents[: len(builtin_documents())] == builtin_documents()
    assert sum(len(d) for d in documents) > 5_000_000


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
    assert bundle.train_tokens + bundle.val_tokens + bundle.test_tokens <= 5_000


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


# -- the BPE never learns from text the run holds out or drops ------------------------------


def _marker_documents(count: int) -> list[str]:
    """`count` documents, each made of its own CJK character (a marker no other document has),
    repeated often enough that a BPE trained on it learns the character as one token."""
    return [(chr(0x4E00 + index) * 4 + " ") * 40 for index in range(count)]


def _texts(bundle: Any) -> tuple[str, str]:
    tokenizer = bundle.tokenizer
    train = tokenizer.decode(bundle.train_loader.sequences.flatten().tolist())
    val = tokenizer.decode(bundle.val_loader.sequences.flatten().tolist())
    return train, val


def _learned(tokenizer: Any, char: str) -> bool:
    """Whether some vocabulary entry holds the whole character (merged from its bytes)."""
    return any(char in tokenizer.decode([i]) for i in range(tokenizer.vocab_size))


def test_bpe_never_learns_the_validation_tail_of_a_single_file(tmp_path: Path) -> None:
    """One file: the positional split holds out its tail, which the BPE must never see."""
    path = tmp_path / "one.txt"
    path.write_text("".join(_marker_documents(12)), encoding="utf-8")
    bundle = build_data(
        DataConfig(
            source="files", paths=[str(path)], tokenizer="bpe", bpe_vocab_size=400, val_fraction=0.2
        ),
        _training(seq_len=16, batch_size=2),
    )
    train, val = _texts(bundle)
    markers = [chr(0x4E00 + index) for index in range(12)]
    val_only = [c for c in markers if c in val and c not in train]
    train_side = [c for c in markers if c in train]
    assert val_only and train_side  # the check below has something to catch
    # A merged token is a piece of the tokenizer's training text: a marker that only validation
    # holds cannot be in one; the training-side markers show that the check can see.
    assert not any(_learned(bundle.tokenizer, c) for c in val_only)
    assert all(_learned(bundle.tokenizer, c) for c in train_side)


def test_bpe_learns_only_from_the_training_side_after_max_tokens(tmp_path: Path) -> None:
    """Many documents: neither held-out nor max_tokens-dropped documents shape the BPE."""
    documents = _marker_documents(16)
    size = len(documents[0].encode("utf-8")) + 1  # every document has this many byte tokens
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    bundle = build_data(
        DataConfig(
            source="files",
            paths=[str(path)],
            tokenizer="bpe",
            bpe_vocab_size=400,
            val_fraction=0.2,
            test_fraction=0.1,
            max_tokens=10 * size,  # exactly 10 whole documents
        ),
        _training(seq_len=16, batch_size=2),
    )
    train, val = _texts(bundle)
    markers = [chr(0x4E00 + index) for index in range(16)]
    held_out = [c for c in markers if c in val and c not in train]
    # dropped by max_tokens (6) or held out for test (1)
    dropped = [c for c in markers if c not in val and c not in train]
    kept = [c for c in markers if c in train]
    assert len(held_out) == 2 and len(dropped) == 7 and len(kept) == 7
    assert not any(_learned(bundle.tokenizer, c) for c in held_out + dropped)
    assert all(_learned(bundle.tokenizer, c) for c in kept)


def test_bpe_short_validation_text_is_redrawn_with_room_for_one_sequence(tmp_path: Path) -> None:
    """A held-out tail that is one sequence of bytes is too short once BPE merges it; the split
    grows it instead of failing, and still keeps it out of the tokenizer's training text."""
    path = tmp_path / "one.txt"
    path.write_text("".join(_marker_documents(6)), encoding="utf-8")
    bundle = build_data(
        DataConfig(
            source="files",
            paths=[str(path)],
            tokenizer="bpe",
            bpe_vocab_size=400,
            val_fraction=0.01,
        ),
        _training(seq_len=64, batch_size=2),
    )
    assert len(bundle.val_loader.sequences) >= 1
    train, val = _texts(bundle)
    val_only = [c for c in (chr(0x4E00 + i) for i in range(6)) if c in val and c not in train]
    assert val_only
    assert not any(_learned(bundle.tokenizer, c) for c in val_only)
