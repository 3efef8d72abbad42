"""Training data: tokenizers, corpus sources, deterministic split and packing, and loaders.

`build_data(data_config, training_config)` is the one entry point the runner needs: it reads
the configured corpus, tokenizes it (byte-level, or a BPE trained on the training documents),
splits it deterministically into train/validation by document, packs both into sequences of
``training.seq_len`` tokens and returns loaders over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stackwise.config.base import DataConfig, TrainingConfig
from stackwise.data.loader import SequenceLoader
from stackwise.data.packing import PackedSplits, pack, split_and_pack
from stackwise.data.sources import builtin_documents, load_documents
from stackwise.data.tokenizer import SPECIAL_TOKENS, BPETokenizer, ByteTokenizer, Tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "BPETokenizer",
    "ByteTokenizer",
    "DataBundle",
    "PackedSplits",
    "SequenceLoader",
    "Tokenizer",
    "build_data",
    "build_tokenizer",
    "builtin_documents",
    "load_documents",
    "pack",
    "split_and_pack",
]


@dataclass
class DataBundle:
    """Everything a run needs from the data side."""

    tokenizer: Tokenizer
    train_loader: SequenceLoader
    val_loader: SequenceLoader
    train_tokens: int
    val_tokens: int


def _validation_documents(documents: list[str], data: DataConfig, seed: int) -> set[int]:
    """Indices of documents that the by-document split would hold out (to keep BPE honest)."""
    order = np.random.default_rng(seed).permutation(len(documents))
    lengths = [len(documents[i].encode("utf-8")) + 1 for i in order]
    target = data.val_fraction * sum(lengths)
    held: set[int] = set()
    total = 0
    for position, index in enumerate(order[:-1]):
        if total >= target:
            break
        held.add(int(index))
        total += lengths[position]
    return held


def build_tokenizer(data: DataConfig, documents: list[str], seed: int = 0) -> Tokenizer:
    """The configured tokenizer; a BPE is trained on the training-side documents only."""
    if data.tokenizer == "byte":
        return ByteTokenizer()
    held_out = _validation_documents(documents, data, seed)
    training_text = [doc for i, doc in enumerate(documents) if i not in held_out] or documents
    return BPETokenizer.train(training_text, data.bpe_vocab_size)


def _encode_all(tokenizer: Tokenizer, documents: list[str]) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):
        return [tokenizer.encode_array(doc) for doc in documents]
    if isinstance(tokenizer, BPETokenizer):
        return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(documents)]
    return [np.asarray(tokenizer.encode(doc), dtype=np.int64) for doc in documents]


def build_data(data: DataConfig, training: TrainingConfig) -> DataBundle:
    """Read, tokenize, split and pack the configured corpus; loaders use `training.batch_size`."""
    documents = load_documents(data)
    tokenizer = build_tokenizer(data, documents, training.seed)
    splits = split_and_pack(
        _encode_all(tokenizer, documents),
        val_fraction=data.val_fraction,
        seq_len=training.seq_len,
        seed=training.seed,
        eos_id=tokenizer.eos_id,
        max_tokens=data.max_tokens,
    )
    train_loader = SequenceLoader(
        splits.train, training.batch_size, shuffle=True, seed=training.seed, drop_last=True
    )
    val_loader = SequenceLoader(splits.val, training.batch_size, shuffle=False, drop_last=False)
    return DataBundle(
        tokenizer=tokenizer,
        train_loader=train_loader,
        val_loader=val_loader,
        train_tokens=int(splits.train.numel()),
        val_tokens=int(splits.val.numel()),
    )
