"""A run's data: the split, tokenization and packing of its corpus, and loaders over it.

The implementation of `stackwise.data.build_data` (see the package docstring for how the split,
``max_tokens`` and a BPE fit together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stackwise.config.base import DataConfig, TrainingConfig
from stackwise.data.loader import SequenceLoader
from stackwise.data.packing import DocumentSplit, PackedSplits, pack, split_documents
from stackwise.data.sources import load_documents
from stackwise.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer


@dataclass
class DataBundle:
    """Everything a run needs from the data side."""

    tokenizer: Tokenizer
    train_loader: SequenceLoader
    val_loader: SequenceLoader
    train_tokens: int
    val_tokens: int
    test_loader: SequenceLoader | None = None
    test_tokens: int = 0


def build_tokenizer(data: DataConfig, training_documents: list[str]) -> Tokenizer:
    """The configured tokenizer; a BPE is trained on `training_documents` (and nothing else), a
    tokenizer file is read as it is."""
    if data.tokenizer == "byte":
        return ByteTokenizer()
    if data.tokenizer == "hf":
        assert data.tokenizer_file is not None  # the config's check
        return BPETokenizer.from_file(data.tokenizer_file)
    return BPETokenizer.train(training_documents, data.bpe_vocab_size)


def _as_text(piece: np.ndarray) -> str:
    # A piece cut inside a multi-byte character loses that character on both sides.
    return piece.astype(np.uint8).tobytes().decode("utf-8", errors="ignore")


def _split(
    data: DataConfig, training: TrainingConfig, byte_docs: list[np.ndarray], min_val_tokens: int = 0
) -> DocumentSplit:
    return split_documents(
        byte_docs,
        val_fraction=data.val_fraction,
        seq_len=training.seq_len,
        seed=data.split_seed,
        max_tokens=data.max_tokens,
        min_val_tokens=min_val_tokens,
        test_fraction=data.test_fraction,
    )


def _encode_all(tokenizer: Tokenizer, documents: list[str]) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):
        return [tokenizer.encode_array(doc) for doc in documents]
    if isinstance(tokenizer, BPETokenizer):
        return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(documents)]
    return [np.asarray(tokenizer.encode(doc), dtype=np.int64) for doc in documents]


def split_and_tokenize(
    data: DataConfig, training: TrainingConfig, documents: list[str]
) -> tuple[Tokenizer, PackedSplits]:
    """The tokenizer and the packed train/validation sequences of `documents` (module doc)."""
    byte_docs = [ByteTokenizer().encode_array(doc) for doc in documents]
    split = _split(data, training, byte_docs)
    seq_len = training.seq_len
    if data.tokenizer == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
        train_ids, val_ids, test_ids = split.train, split.val, split.test
    else:
        for attempt in range(2):
            train_text = [_as_text(piece) for piece in split.train]
            tokenizer = build_tokenizer(data, train_text)
            train_ids = _encode_all(tokenizer, train_text)
            val_ids = _encode_all(tokenizer, [_as_text(piece) for piece in split.val])
            test_ids = _encode_all(tokenizer, [_as_text(piece) for piece in split.test])
            val_rows = sum(len(ids) + 1 for ids in val_ids) // seq_len
            test_rows = sum(len(ids) + 1 for ids in test_ids) // seq_len
            enough = val_rows >= 1 and (data.test_fraction <= 0 or test_rows >= 1)
            if enough or attempt == 1:
                break
            # Hold out (positionally) enough bytes for one sequence of BPE tokens, with margin.
            train_tokens = max(1, sum(len(ids) for ids in train_ids))
            bytes_per_token = sum(len(piece) for piece in split.train) / train_tokens
            split = _split(
                data,
                training,
                byte_docs,
                min_val_tokens=math.ceil(1.25 * seq_len * bytes_per_token),
            )
    train = pack(train_ids, seq_len, tokenizer.eos_id)
    val = pack(val_ids, seq_len, tokenizer.eos_id)
    test = pack(test_ids, seq_len, tokenizer.eos_id) if data.test_fraction > 0 else None
    if len(train) < 1 or len(val) < 1 or (test is not None and len(test) < 1):
        sides = (
            "a train, a validation and a test" if test is not None else "a train and a validation"
        )
        raise ValueError(
            f"data: after tokenization the corpus has too few tokens for {sides} "
            f"sequence of training.seq_len={seq_len} tokens; add text, raise data.max_tokens "
            f"or lower training.seq_len"
        )
    corpus = sum(len(ids) + 1 for side in (train_ids, val_ids, test_ids) for ids in side)
    return tokenizer, PackedSplits(train, val, corpus, test)


def build_data(data: DataConfig, training: TrainingConfig) -> DataBundle:
    """Read, split, tokenize and pack the configured corpus; loaders use `training.batch_size`.
    A prepared corpus (``data.source: prepared``) is read from its memory-mapped shards
    instead (`stackwise.data.prepared.load_prepared`)."""
    if data.source == "prepared":
        from stackwise.data.prepared import load_prepared

        tokenizer, train, val, test_side = load_prepared(data, training)
        return DataBundle(
            tokenizer=tokenizer,
            train_loader=train,
            val_loader=val,
            train_tokens=train.num_tokens,
            val_tokens=val.num_tokens,
            test_loader=test_side,
            test_tokens=0 if test_side is None else test_side.num_tokens,
        )
    tokenizer, splits = split_and_tokenize(data, training, load_documents(data))
    train_loader = SequenceLoader(
        splits.train, training.batch_size, shuffle=True, seed=training.seed, drop_last=True
    )
    val_loader = SequenceLoader(splits.val, training.batch_size, shuffle=False, drop_last=False)
    test = splits.test
    test_loader = (
        None
        if test is None
        else SequenceLoader(test, training.batch_size, shuffle=False, drop_last=False)
    )
    return DataBundle(
        tokenizer=tokenizer,
        train_loader=train_loader,
        val_loader=val_loader,
        train_tokens=int(splits.train.numel()),
        val_tokens=int(splits.val.numel()),
        test_loader=test_loader,
        test_tokens=0 if test is None else int(test.numel()),
    )
