"""How long a corpus is, told before a run reads it for training (the pre-run checks).

`corpus_size(data)` gives the UTF-8 length in bytes of every document a data config reads, in
reading order: exactly the tokens of the byte tokenizer, and an upper bound on the tokens of a
byte-level BPE (each of its tokens is one byte or more). Nothing is tokenized, and a large
corpus is not read:

- the built-in corpus: its text (already in memory);
- the `stdlib` corpus: the built-in text, then the size of each source file of the library;
- ``data.paths`` of at most `READ_LIMIT` bytes in all: read as the loader reads them, so every
  length is exact (and a JSONL or Parquet file the loader would refuse is refused here);
- larger ``data.paths``: each text file by its size (its text, when it is UTF-8: a byte the
  loader cannot decode grows into a three-byte replacement character), opened only to see that
  it holds more than whitespace. Their documents unknown without reading them, JSONL and Parquet
  files only bound the corpus by their size (`CorpusSize.unread_bytes`).

`training_tokens` tells from the lengths alone (no numpy) whether the split gives every side a
sequence and bounds its training side; where that leaves the answer open,
`stackwise.data.packing.split_lengths` splits the lengths exactly as training will.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

from stackwise.config.base import DataConfig
from stackwise.data.sources import (
    builtin_documents,
    expand_paths,
    file_format,
    read_documents,
    stdlib_files,
)

READ_LIMIT = 64 << 20  # bytes of data.paths read in full to count their documents exactly
_PEEK = 1 << 16


@dataclass(frozen=True)
class CorpusSize:
    """The documents of a data config, by their UTF-8 length in bytes (see the module doc)."""

    lengths: list[int]  # every document counted, in reading order
    unread_bytes: int = 0  # size of the JSONL/Parquet files not read: at most this much more text
    formats: frozenset[str] = frozenset()  # of the files read: text, jsonl, parquet


def has_text(path: Path) -> bool:
    """Whether the text file holds anything but whitespace (as the loader reads it: UTF-8,
    undecodable bytes replaced); reads only up to its first other character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with path.open("rb") as handle:
        while chunk := handle.read(_PEEK):
            if decoder.decode(chunk).strip():
                return True
    return bool(decoder.decode(b"", final=True).strip())


def _utf8_lengths(documents: list[str]) -> list[int]:
    return [len(document.encode("utf-8")) for document in documents]


def corpus_size(data: DataConfig) -> CorpusSize:
    """The documents of `data` (paths already resolved) by length; see the module doc. Raises
    what the loader raises for files it cannot read (`ValueError`, `FileNotFoundError`)."""
    if data.source == "builtin":
        return CorpusSize(_utf8_lengths(builtin_documents()))
    if data.source == "stdlib":
        texts = [p.stat().st_size for p in stdlib_files() if has_text(p)]
        return CorpusSize(_utf8_lengths(builtin_documents()) + texts)
    files = expand_paths(list(data.paths))
    sizes = [path.stat().st_size for path in files]
    read = sum(sizes) <= READ_LIMIT
    lengths: list[int] = []
    unread = 0
    formats = frozenset(file_format(path, data.format) for path in files)
    for path, size in zip(files, sizes, strict=True):
        fmt = file_format(path, data.format)
        if read:
            lengths += _utf8_lengths(read_documents(path, fmt, data.text_column))
        elif fmt == "text":
            lengths += [size] if has_text(path) else []
        else:
            unread += size
    return CorpusSize(lengths, unread, formats)


@dataclass(frozen=True)
class TrainingTokens:
    """The tokens of the training side of a split, as far as the lengths tell: from `low` to
    `high` (equal: exact). `upper` marks a bound only: JSONL/Parquet text not counted."""

    low: int
    high: int
    upper: bool = False


def corpus_tokens(lengths: list[int], max_tokens: int | None) -> tuple[int, int]:
    """(fewest, most) tokens the split sees: each document with its [EOS], cut to `max_tokens`
    (`stackwise.data.packing.limit_tokens` keeps shuffled documents until `max_tokens`, and
    ends with ``max_tokens - 1`` or ``max_tokens`` of them, as the shuffle falls)."""
    total = sum(n + 1 for n in lengths)
    if max_tokens is None or total <= max_tokens:
        return total, total
    if len(lengths) == 1:
        return max_tokens, max_tokens
    return max_tokens - 1, max_tokens


def training_tokens(size: CorpusSize, data: DataConfig, seq_len: int) -> TrainingTokens | None:
    """What the lengths alone tell of the training side of the split into sequences of
    `seq_len` tokens, without drawing its shuffle (which needs numpy): None when only the split
    itself can tell (it may not give each side one sequence; `packing.split_lengths`).

    The split gives every side a sequence exactly when the corpus holds 2 (with a test side 3)
    sequences' worth of tokens. One document splits by position, exactly; several split by
    document: each held-out side overshoots its fraction by less than one document, and
    packing drops less than a sequence, which bounds the training side from below.
    """
    if size.unread_bytes:
        total = sum(n + 1 for n in size.lengths) + size.unread_bytes
        return TrainingTokens(0, min(total, data.max_tokens or total), upper=True)
    fewest, most = corpus_tokens(size.lengths, data.max_tokens)
    sides = 3 if data.test_fraction > 0 else 2
    if fewest < sides * seq_len:
        return None
    if len(size.lengths) == 1:  # the positional split of `packing.split_documents`
        rows = most // seq_len
        held_out = max(1, round(data.val_fraction * rows))
        if data.test_fraction > 0:
            held_out += max(1, round(data.test_fraction * rows))
        exact = (rows - held_out) * seq_len
        return TrainingTokens(exact, exact)
    kept = 1.0 - data.val_fraction - data.test_fraction
    slack = max(2 * (max(size.lengths) + 1) + seq_len, 3 * seq_len)
    return TrainingTokens(max(0, int(fewest * kept) - slack), most)
