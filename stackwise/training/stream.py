"""Batches as the trainer reads them: unpacked from any loader, in an endless resumable stream.

A training loader may yield ``LongTensor [B, T]`` batches, dicts with ``input_ids`` (and
``attention_mask``), or tuples ``(input_ids, attention_mask)`` as a `TensorDataset` of both
yields (`unpack_batch`). `BatchStream` reads such a loader pass after pass from a position
``(epoch, index)`` a checkpoint can store, and says which tokens it reads for the first time
(the run's *unique* tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from stackwise.training.errors import TrainingError


def _is_padding_mask(mask: Any, ids: torch.Tensor) -> bool:
    return (
        isinstance(mask, torch.Tensor)
        and mask.shape == ids.shape
        and bool(((mask == 0) | (mask == 1)).all())
    )


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask) from a tensor, a dict with input_ids, or a tuple whose first
    item is input_ids and whose optional second item is the attention mask (as a `TensorDataset`
    of ids and mask yields)."""
    if isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    elif isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise TrainingError("a dict batch must have an 'input_ids' entry")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    elif isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        ids, mask = batch[0], (batch[1] if len(batch) > 1 else None)
        if mask is not None and not _is_padding_mask(mask, ids):
            raise TrainingError(
                "the second item of a tuple batch must be an attention mask of 0/1 shaped like "
                "input_ids; pass other tensors as a dict with 'input_ids' and 'attention_mask'"
            )
    else:
        raise TrainingError(
            f"batches must be LongTensor [B, T] or dicts with 'input_ids', got {type(batch)}"
        )
    if ids.dim() != 2:
        raise TrainingError(f"input_ids must be [B, T], got shape {tuple(ids.shape)}")
    return ids.long(), (None if mask is None else mask.long())


def token_count(ids: torch.Tensor, mask: torch.Tensor | None) -> int:
    """Training tokens of a batch: every position, or the real ones under a padding mask."""
    return ids.numel() if mask is None else int(mask.sum())


def first_pass(loader: Iterable[Any]) -> Iterator[Any]:
    """One pass over `loader` from its beginning (epoch 0 of a `SequenceLoader`)."""
    iter_epoch = getattr(loader, "iter_epoch", None)
    return iter(iter_epoch(0, 0)) if callable(iter_epoch) else iter(loader)


class BatchStream:
    """An endless, resumable stream over any iterable of batches.

    The position is ``(epoch, index)``: passes completed over the iterable and batches taken
    from the current pass. Loaders with ``iter_epoch(epoch, start)`` (`SequenceLoader`) restart
    there directly; other iterables are re-iterated and the first ``index`` batches skipped
    (which is exact for deterministic iterables such as lists).
    """

    def __init__(self, loader: Iterable[Any], epoch: int = 0, index: int = 0) -> None:
        self.loader = loader
        self.epoch = epoch
        self.index = index
        self._iterator: Iterator[Any] | None = None

    @property
    def position(self) -> tuple[int, int]:
        return (self.epoch, self.index)

    def _open(self) -> Iterator[Any]:
        iter_epoch = getattr(self.loader, "iter_epoch", None)
        if callable(iter_epoch):
            return iter(iter_epoch(self.epoch, self.index))
        set_epoch = getattr(self.loader, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        iterator = iter(self.loader)
        for _ in range(self.index):
            next(iterator)
        return iterator

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        for _ in range(2):
            if self._iterator is None:
                self._iterator = self._open()
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch, self.index = self.epoch + 1, 0
                continue
            self.index += 1
            return unpack_batch(batch)
        raise TrainingError("the training dataloader yields no batches")

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The next batch, and how many of its tokens are read for the first time: all of
        them while the stream is in its first pass over the data, else none."""
        ids, mask = self.next()
        return ids, mask, (token_count(ids, mask) if self.epoch == 0 else 0)
