"""Batches of packed sequences with a deterministic, resumable order.

`SequenceLoader` yields LongTensor batches ``[B, T]`` for one epoch per iteration. With
``shuffle=True`` the order of epoch ``e`` is a permutation drawn from ``seed + e``, so the data
position is fully described by ``(epoch, index)`` — the epoch number and the number of batches
already taken from it — and `iter_epoch(epoch, start)` restarts exactly there. Iterating the
loader itself continues from its current position and advances it (the trainer keeps its own
position and calls `iter_epoch`, which is how a resumed run sees the same batches).

The sequences are a tensor, or a numpy array such as the read-only memory map of a prepared
corpus (`stackwise.data.prepared`): then each batch reads only its rows, as int64.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np
import torch

# Batches read from a memory-mapped corpus between two releases of its mapped pages.
RELEASE_EVERY = 32


def release_mapped_pages(rows: torch.Tensor | np.ndarray) -> None:
    """Hand the pages of a memory-mapped corpus read so far back to the kernel: they stay in
    the page cache (a later read finds them there) but leave this process's resident set, which
    otherwise grows with every row read until it holds the whole file (an evaluation over a
    large test split reads all of it). A no-op for arrays in memory."""
    mapping = getattr(rows, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


class SequenceLoader:
    """Deterministic batches over a fixed tensor of sequences."""

    def __init__(
        self,
        sequences: torch.Tensor | np.ndarray,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if sequences.ndim != 2:
            raise ValueError(f"sequences must be [N, T], got shape {tuple(sequences.shape)}")
        self.sequences = sequences
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        # A corpus smaller than one batch still yields its (short) batch rather than nothing.
        self.drop_last = drop_last and len(sequences) >= batch_size
        self.epoch = 0
        self.index = 0
        self.rows_of: tuple[int, int] | None = None  # (rank, world): see `read_rows_of`

    def read_rows_of(self, rank: int, world: int) -> None:
        """Read only the rows ``[rank::world]`` of each batch from a memory-mapped corpus, the
        rows one process of a run of `world` keeps (`stackwise.training.distributed`); the
        other rows of the batch are zeros. The processes of a run then read disjoint rows,
        and a batch keeps its shape, so every draw made on it (the corruption of the
        objective draws by shape, never by value) is the same in each process. An in-memory
        corpus is read whole, as before."""
        if isinstance(self.sequences, np.ndarray) and world > 1:
            self.rows_of = (rank, world)

    def __len__(self) -> int:
        n = len(self.sequences)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_tokens(self) -> int:
        rows, seq_len = self.sequences.shape
        return int(rows) * int(seq_len)

    def order(self, epoch: int) -> torch.Tensor:
        """Sample indices of `epoch` in visiting order: 4 bytes a row below 2**31 rows (the
        permutation of int64 would have the same values at twice the memory, which for a
        corpus of billions of tokens is what the loader holds)."""
        n = len(self.sequences)
        dtype = torch.int32 if n < 2**31 else torch.int64
        if not self.shuffle:
            return torch.arange(n, dtype=dtype)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(n, generator=generator, dtype=dtype)

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """Batches of `epoch`, beginning with batch number `start`."""
        order = self.order(epoch)
        for batch_index in range(start, len(self)):
            if (batch_index - start) % RELEASE_EVERY == RELEASE_EVERY - 1:
                release_mapped_pages(self.sequences)
            rows = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            if isinstance(self.sequences, np.ndarray) and self.rows_of is not None:
                rank, world = self.rows_of
                batch = torch.zeros((len(rows), self.sequences.shape[1]), dtype=torch.int64)
                own = self.sequences[rows[rank::world].numpy()]
                batch[rank::world] = torch.from_numpy(own.astype(np.int64))
                yield batch
            elif isinstance(self.sequences, np.ndarray):
                yield torch.from_numpy(self.sequences[rows.numpy()].astype(np.int64))
            else:
                yield self.sequences[rows.long()]

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, start = self.epoch, self.index
        for batch in self.iter_epoch(epoch, start):
            self.index += 1
            yield batch
        self.epoch, self.index = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
