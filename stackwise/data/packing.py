"""Deterministic train/validation/test split and packing of documents into fixed-length sequences.

Documents are shuffled once with the split seed and split *by document*: whole documents go to
validation until it holds ``val_fraction`` of the tokens, then to test until it holds
``test_fraction``, the rest to training, so no text appears on two sides. Each split is then
packed: documents are concatenated with an [EOS] token after each, and the stream is cut into
non-overlapping sequences of ``seq_len`` tokens (the incomplete tail is dropped).

When the corpus has too few documents for a by-document split to give every side at least one
full sequence (e.g. a single text file), the packed stream is split by position instead: the
stream is training, then validation (``val_fraction`` of it, at least one sequence), then test.

`split_documents` does the split alone and returns the sides as lists of token arrays (a
document cut by the positional split appears as its head on one side and its tail on the other),
so that the same split can be computed on UTF-8 bytes *before* a tokenizer exists: a BPE is then
trained on the training side only (see `stackwise.data.build_data`). `split_and_pack` is
`split_documents` followed by `pack` of each side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where a tensor is made: the split itself needs no torch
    import torch


@dataclass
class PackedSplits:
    train: torch.Tensor  # [N, seq_len] int64
    val: torch.Tensor  # [M, seq_len] int64
    corpus_tokens: int  # tokens (with separators) after the max_tokens limit
    test: torch.Tensor | None = None  # [K, seq_len] int64; None without a test split


def limit_tokens(documents: list[np.ndarray], max_tokens: int | None) -> list[np.ndarray]:
    """Keep documents (in order) until `max_tokens` tokens, counting one separator each."""
    if max_tokens is None:
        return documents
    kept: list[np.ndarray] = []
    budget = max_tokens
    for doc in documents:
        if budget <= 1:
            break
        take = min(len(doc), budget - 1)
        kept.append(doc[:take])
        budget -= take + 1
    return kept


def pack(documents: list[np.ndarray], seq_len: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents with [EOS] after each and cut into rows of `seq_len` tokens."""
    import torch

    stream = _stream(documents, eos_id)
    n_rows = len(stream) // seq_len
    return torch.from_numpy(stream[: n_rows * seq_len].reshape(n_rows, seq_len).copy())


def _stream(documents: list[np.ndarray], eos_id: int) -> np.ndarray:
    if not documents:
        return np.zeros(0, dtype=np.int64)
    eos = np.array([eos_id], dtype=np.int64)
    parts: list[np.ndarray] = []
    for doc in documents:
        parts.append(doc.astype(np.int64, copy=False))
        parts.append(eos)
    return np.concatenate(parts)


@dataclass
class DocumentSplit:
    """The sides of a split, as documents (or document pieces) before packing."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    corpus_tokens: int  # tokens (with separators) after the max_tokens limit
    by_document: bool  # False: the positional fallback
    test: list[np.ndarray] = field(default_factory=list)


def packed_rows(documents: list[np.ndarray], seq_len: int) -> int:
    """Rows of `seq_len` tokens that `pack` makes of `documents`."""
    return sum(len(d) + 1 for d in documents) // seq_len


def _take(documents: list[np.ndarray], target: float) -> list[np.ndarray]:
    """Leading documents until they hold `target` tokens (with separators)."""
    taken: list[np.ndarray] = []
    tokens = 0
    for doc in documents:
        if tokens >= target:
            break
        taken.append(doc)
        tokens += len(doc) + 1
    return taken


def split_documents(
    documents: list[np.ndarray],
    *,
    val_fraction: float,
    seq_len: int,
    seed: int,
    max_tokens: int | None = None,
    min_val_tokens: int = 0,
    test_fraction: float = 0.0,
) -> DocumentSplit:
    """Shuffle documents with `seed`, apply `max_tokens`, split by document (see module doc).

    With ``min_val_tokens > 0`` the split is positional and holds out at least that many tokens
    for validation and for test each (a caller whose tokens are bytes uses it to make room for
    one sequence of coarser tokens).
    """
    order = np.random.default_rng(seed).permutation(len(documents))
    shuffled = limit_tokens([documents[i] for i in order], max_tokens)
    total = sum(len(d) + 1 for d in shuffled)

    if min_val_tokens <= 0:
        # The training side keeps at least one document.
        val_docs = _take(shuffled[:-1], val_fraction * total)
        rest = shuffled[len(val_docs) :]
        test_docs = _take(rest[:-1], test_fraction * total) if test_fraction > 0 else []
        train_docs = rest[len(test_docs) :]
        enough = packed_rows(train_docs, seq_len) >= 1 and packed_rows(val_docs, seq_len) >= 1
        if enough and (test_fraction <= 0 or packed_rows(test_docs, seq_len) >= 1):
            return DocumentSplit(train_docs, val_docs, total, by_document=True, test=test_docs)

    # Too few documents: split the packed stream by position instead, at row boundaries.
    n_rows = total // seq_len
    least = -(-min_val_tokens // seq_len)
    n_val = max(1, round(val_fraction * n_rows), least)
    n_test = max(1, round(test_fraction * n_rows), least) if test_fraction > 0 else 0
    if n_rows - n_val - n_test < 1:
        sides = "a train, a validation and a test" if n_test else "a train and a validation"
        raise ValueError(
            f"data: the corpus has {total} tokens, too few for {sides} sequence of "
            f"training.seq_len={seq_len} tokens; add text, raise data.max_tokens "
            f"or lower training.seq_len"
        )
    train, held_out = _cut_stream(shuffled, (n_rows - n_val - n_test) * seq_len)
    val, test = _cut_stream(held_out, n_val * seq_len) if n_test else (held_out, [])
    return DocumentSplit(train, val, total, by_document=False, test=test)


def split_lengths(
    lengths: Sequence[int],
    *,
    val_fraction: float,
    seq_len: int,
    seed: int,
    max_tokens: int | None = None,
    test_fraction: float = 0.0,
) -> DocumentSplit:
    """`split_documents` of documents with these token counts, without their tokens: the split
    depends on the lengths only, so the sizes of a corpus tell whether (and how) it splits
    before it is read. The sides hold zero-filled views that take no memory."""
    zero = np.zeros(1, dtype=np.uint8)
    documents = [np.broadcast_to(zero, (int(n),)) for n in lengths]
    return split_documents(
        documents,
        val_fraction=val_fraction,
        seq_len=seq_len,
        seed=seed,
        max_tokens=max_tokens,
        test_fraction=test_fraction,
    )


def _cut_stream(documents: list[np.ndarray], cut: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Documents before and after position `cut` of their packed stream.

    A document the cut falls into is split into its head (training side) and tail (validation
    side, possibly empty when the cut falls on its [EOS]). Packing the two lists gives the
    stream's rows before and after the cut when `cut` is a multiple of the sequence length.
    """
    train: list[np.ndarray] = []
    position = 0
    for index, doc in enumerate(documents):
        if position + len(doc) + 1 <= cut:
            train.append(doc)
            position += len(doc) + 1
            continue
        offset = cut - position
        if offset == 0:
            return train, list(documents[index:])
        return [*train, doc[:offset]], [doc[offset:], *documents[index + 1 :]]
    return train, []


def split_and_pack(
    documents: list[np.ndarray],
    *,
    val_fraction: float,
    seq_len: int,
    seed: int,
    eos_id: int,
    max_tokens: int | None = None,
    test_fraction: float = 0.0,
) -> PackedSplits:
    """Shuffle documents with `seed`, apply `max_tokens`, split by document, pack every side."""
    split = split_documents(
        documents,
        val_fraction=val_fraction,
        seq_len=seq_len,
        seed=seed,
        max_tokens=max_tokens,
        test_fraction=test_fraction,
    )
    train = pack(split.train, seq_len, eos_id)
    val = pack(split.val, seq_len, eos_id)
    test = pack(split.test, seq_len, eos_id) if test_fraction > 0 else None
    return PackedSplits(train, val, split.corpus_tokens, test)
