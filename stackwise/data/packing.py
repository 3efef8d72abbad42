"""Deterministic train/validation split and packing of documents into fixed-length sequences.

Documents are shuffled once with the run's seed and split *by document* (whole documents go to
validation until it holds ``val_fraction`` of the tokens), so no text appears on both sides. Each
split is then packed: documents are concatenated with an [EOS] token after each, and the stream is
cut into non-overlapping sequences of ``seq_len`` tokens (the incomplete tail is dropped).

When the corpus has too few documents for a by-document split to give both sides at least one
full sequence (e.g. a single text file), the packed stream is split by position instead: the last
``val_fraction`` of it (at least one sequence) is held out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedSplits:
    train: torch.Tensor  # [N, seq_len] int64
    val: torch.Tensor  # [M, seq_len] int64
    corpus_tokens: int  # tokens (with separators) after the max_tokens limit


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


def split_and_pack(
    documents: list[np.ndarray],
    *,
    val_fraction: float,
    seq_len: int,
    seed: int,
    eos_id: int,
    max_tokens: int | None = None,
) -> PackedSplits:
    """Shuffle documents with `seed`, apply `max_tokens`, split by document, pack both sides."""
    order = np.random.default_rng(seed).permutation(len(documents))
    shuffled = limit_tokens([documents[i] for i in order], max_tokens)
    total = sum(len(d) + 1 for d in shuffled)
    target_val = val_fraction * total

    val_docs: list[np.ndarray] = []
    val_tokens = 0
    for doc in shuffled[:-1]:  # the training side keeps at least one document
        if val_tokens >= target_val:
            break
        val_docs.append(doc)
        val_tokens += len(doc) + 1
    train_docs = shuffled[len(val_docs) :]
    train = pack(train_docs, seq_len, eos_id)
    val = pack(val_docs, seq_len, eos_id)
    if len(train) >= 1 and len(val) >= 1:
        return PackedSplits(train, val, total)

    # Too few documents: split the packed stream by position instead.
    rows = pack(shuffled, seq_len, eos_id)
    n_val = max(1, round(val_fraction * len(rows)))
    if len(rows) - n_val < 1:
        raise ValueError(
            f"data: the corpus has {total} tokens, too few for a train and a validation "
            f"sequence of training.seq_len={seq_len} tokens; add text, raise data.max_tokens "
            f"or lower training.seq_len"
        )
    return PackedSplits(rows[:-n_val].clone(), rows[-n_val:].clone(), total)
