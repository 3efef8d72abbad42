"""Tokenizers: a byte-level tokenizer that needs nothing, and an optional locally trained BPE.

Both expose the same small interface (`Tokenizer`): ``vocab_size``, the special-token ids
``pad_id``, ``mask_id``, ``bos_id``, ``eos_id`` (all four in ``special_ids``), and
``encode(text) -> list[int]`` / ``decode(ids) -> str``. `special_ids_for` recovers the special
ids from a vocabulary size and a [MASK] id, for code that is handed only those.

- `ByteTokenizer`: ids 0..255 are the UTF-8 bytes of the text; 256..259 are [PAD], [MASK], [BOS],
  [EOS] (vocabulary 260 = `stackwise.config.base.BYTE_VOCAB_SIZE`).
- `BPETokenizer`: byte-level BPE trained on the training documents with the `tokenizers` library;
  the special tokens take ids 0..3. It is saved and loaded as the library's JSON format (never
  pickled).
"""

from __future__ import annotations

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
