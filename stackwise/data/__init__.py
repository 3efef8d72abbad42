"""Training data: tokenizers, corpus sources, deterministic split and packing, and loaders.

`build_data(data_config, training_config)` is the one entry point the runner needs: it reads
the configured corpus, splits it deterministically into train/validation/test by document (with
``data.split_seed``, so every replicate seed of a run trains and is tested on the same text),
tokenizes it, packs every side into sequences of ``training.seq_len`` tokens and returns loaders
over them. The test side is never seen by training or by any choice made on validation loss.

The split (and the ``max_tokens`` limit) is decided on the text's UTF-8 bytes — exactly the
tokens of the byte tokenizer — before any tokenizer is trained. A BPE is then trained on the
training side of that split only, as packing will use it (after ``max_tokens``, and in the
positional fallback without the held-out tail), so no validation text shapes its vocabulary.
With BPE, ``max_tokens`` and ``val_fraction`` therefore count bytes; the run holds at most
``max_tokens`` tokens. If the held-out text is too short for one sequence of BPE tokens, the
split is redone positionally with a tail long enough for one (the BPE is trained again).

Every name below is imported from its module when first used: reading and measuring a corpus
(`stackwise.data.sources`, `stackwise.data.sizes`: the pre-run checks) needs neither numpy nor
torch, which tokenizing, packing and loading do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stackwise.data.bundle import DataBundle, build_data, build_tokenizer, split_and_tokenize
    from stackwise.data.loader import SequenceLoader
    from stackwise.data.packing import (
        DocumentSplit,
        PackedSplits,
        pack,
        split_and_pack,
        split_documents,
    )
    from stackwise.data.sources import builtin_documents, load_documents
    from stackwise.data.tokenizer import (
        SPECIAL_TOKENS,
        BPETokenizer,
        ByteTokenizer,
        Tokenizer,
        special_ids_for,
    )

__all__ = [
    "SPECIAL_TOKENS",
    "BPETokenizer",
    "ByteTokenizer",
    "DataBundle",
    "DocumentSplit",
    "PackedSplits",
    "SequenceLoader",
    "Tokenizer",
    "build_data",
    "build_tokenizer",
    "builtin_documents",
    "load_documents",
    "pack",
    "special_ids_for",
    "split_and_pack",
    "split_and_tokenize",
    "split_documents",
]

# name -> the module of this package that defines it
_HOMES = {
    **dict.fromkeys(
        ["DataBundle", "build_data", "build_tokenizer", "split_and_tokenize"], "bundle"
    ),
    "SequenceLoader": "loader",
    **dict.fromkeys(
        ["DocumentSplit", "PackedSplits", "pack", "split_and_pack", "split_documents"], "packing"
    ),
    **dict.fromkeys(["builtin_documents", "load_documents"], "sources"),
    **dict.fromkeys(
        ["SPECIAL_TOKENS", "BPETokenizer", "ByteTokenizer", "Tokenizer", "special_ids_for"],
        "tokenizer",
    ),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
