"""Tokenizers: a byte-level tokenizer that needs nothing, and an optional locally trained BPE.

Both expose the same small interface (`Tokenizer`): ``vocab_size``, the special-token ids
``pad_id``, ``mask_id``, ``bos_id``, ``eos_id`` (all four in ``special_ids``), and
``encode(text) -> list[int]`` / ``decode(ids) -> str``. `special_ids_for` recovers the special
ids from a vocabulary size and a [MASK] id, for code that is handed only those.

- `ByteTokenizer`: ids 0..255 are the UTF-8 bytes of the text; 256..259 are [PAD], [MASK], [BOS],
  [EOS] (vocabulary 260 = `stackwise.config.base.BYTE_VOCAB_SIZE`).
- `BPETokenizer`: a tokenizer of the `tokenizers` library: a byte-level BPE trained on the
  training documents (the special tokens take ids 0..3), or a local Hugging Face
  ``tokenizer.json`` read as it is (`BPETokenizer.from_file`: the special tokens it lacks come
  after its vocabulary). It is saved and loaded as the library's JSON format (never pickled).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from stackwise.config.base import BYTE_VOCAB_SIZE

SPECIAL_TOKENS = ("[PAD]", "[MASK]", "[BOS]", "[EOS]")


class Tokenizer(Protocol):
    """What the data pipeline and the trainer need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def mask_id(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def special_ids(self) -> tuple[int, ...]: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus four special tokens after them."""

    pad_id = 256
    mask_id = 257
    bos_id = 258
    eos_id = 259
    special_ids = (256, 257, 258, 259)
    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path used by the data pipeline: the bytes as an int64 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens have no byte form; they are dropped, and split UTF-8 sequences are
        # replaced rather than raising (a model can emit any byte order).
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library, trained locally (no download)."""

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer
        ids = [self._token_id(token) for token in SPECIAL_TOKENS]
        self.pad_id, self.mask_id, self.bos_id, self.eos_id = ids
        self.special_ids = tuple(ids)

    def _token_id(self, token: str) -> int:
        value = self._tokenizer.token_to_id(token)  # type: ignore[attr-defined]
        if value is None:
            raise ValueError(f"BPE tokenizer has no {token} token")
        return int(value)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train a byte-level BPE with `vocab_size` entries (special tokens included)."""
        try:
            from tokenizers import Tokenizer as HFTokenizer
            from tokenizers import decoders, models, pre_tokenizers, trainers
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "data.tokenizer `bpe` needs the `tokenizers` package: pip install 'stackwise[bpe]'"
            ) from error
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """A Hugging Face ``tokenizer.json`` (any model the library reads: BPE, WordPiece,
        Unigram…), used as it is, with the special tokens of `SPECIAL_TOKENS` it lacks added
        after its vocabulary (in that order). Raises `ValueError` naming ``data.tokenizer_file``
        for a file the library cannot read."""
        from tokenizers import Tokenizer as HFTokenizer

        if not Path(path).is_file():
            raise FileNotFoundError(f"data.tokenizer_file: {path}: no such file")
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception for bad JSON
            raise ValueError(
                f"data.tokenizer_file: {path} is not a Hugging Face tokenizer.json ({error})"
            ) from error
        missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
        if missing:
            tokenizer.add_special_tokens(missing)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Load a tokenizer saved by `save` (the library's JSON format)."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self._tokenizer.save(str(path))  # type: ignore[attr-defined]

    def to_json(self) -> str:
        return str(self._tokenizer.to_str())  # type: ignore[attr-defined]

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size())  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text).ids)  # type: ignore[attr-defined]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(texts)  # type: ignore[attr-defined]
        return [list(e.ids) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode([int(i) for i in ids]))  # type: ignore[attr-defined]


def file_vocab_size(path: str | Path) -> int:
    """The vocabulary of `BPETokenizer.from_file(path)` (its special tokens included), read
    once per version of the file."""
    stat = Path(path).stat()
    return _file_vocab_size(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_vocab_size(path: str, size: int, mtime_ns: int) -> int:
    del size, mtime_ns  # the cache key: another version of the file is read again
    return BPETokenizer.from_file(path).vocab_size


def special_ids_for(vocab_size: int, mask_id: int) -> tuple[int, ...]:
    """The special-token ids of the tokenizer that a vocabulary size and [MASK] id come from.

    The byte tokenizer (vocabulary 260, [MASK] 257) has 256..259; a BPE trained here puts
    [PAD], [MASK], [BOS], [EOS] at 0..3 ([MASK] = 1). For any other layout only the [MASK] id is
    known to be special.
    """
    if vocab_size == BYTE_VOCAB_SIZE and mask_id == ByteTokenizer.mask_id:
        return ByteTokenizer.special_ids
    if mask_id == SPECIAL_TOKENS.index("[MASK]") and vocab_size > len(SPECIAL_TOKENS):
        return tuple(range(len(SPECIAL_TOKENS)))
    return (mask_id,)
