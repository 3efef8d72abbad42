"""Where the blocks of an out-of-core run are: in memory, in a piece file, or not drawn yet.

`training.out_of_core` keeps in memory only what the running stage needs. `PieceStore` is the
trainer's view of the rest:

1. A block not trained yet is on the meta device; `bring_in` draws its seeded initial weights
   (`stackwise.model.materialize.SeededInit`) when its stage starts.
2. When the activation cache has moved past a block, `put_away` writes it to
   ``<folder>/block-NNNNN.safetensors`` and puts it back on the meta device.
3. Anything that must run a block that is away (extending the cache after a resume, the final
   evaluation) `borrow`s it: loaded from its file, used, dropped.
4. `write_rack` writes the trained rack as sharded safetensors without ever holding it whole;
   `discard_pieces` then removes the piece files of a run that keeps no checkpoints (the rack's
   shards hold the same weights).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from stackwise.model.architecture import Rack
from stackwise.model.materialize import (
    SeededInit,
    block_file,
    block_is_meta,
    declared_frozen,
    load_block,
    release_block,
    replace_block,
    save_block,
    write_sharded_rack,
)

#: glibc's ``M_MMAP_THRESHOLD`` option and its initial value: allocations above it are mapped
#: and unmapped on their own instead of coming from the heap.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 128 * 1024


def keep_large_allocations_off_the_heap() -> None:
    """Fix glibc's mmap threshold at its initial 128 KiB (glibc raises it as mapped blocks are
    freed, up to 32 MiB, after which a block's weights and activations come from the heap and
    fragment it: a 512-block out-of-core run left 600 MiB of free heap, partly resident, and
    its peak RSS grew by 10 % over a 4-block run's; with the threshold fixed, 8 %, in the same
    time; one run of each). Process-wide, Linux with glibc only."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps them otherwise, so the
    process would grow by part of every block it put away)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class PieceStore:
    """The out-of-core blocks of one run (see the module docstring)."""

    def __init__(
        self,
        rack: Rack,
        folder: str | Path,
        device: torch.device,
        on_replace: Callable[[int, nn.Module], None],
    ) -> None:
        self.rack = rack
        self.folder = Path(folder)
        self.device = device
        self.on_replace = on_replace  # told when a block module is swapped (new parameters)
        keep_large_allocations_off_the_heap()
        self.seeded = SeededInit(rack)  # also materialises the embedding and the readout
        # Blocks in memory, so that putting away does not visit every block of a deep rack.
        self.resident = {i for i, b in enumerate(rack.blocks) if not block_is_meta(b)}

    def path(self, index: int) -> Path:
        return self.folder / block_file(index)

    def saved(self) -> dict[int, Path]:
        """Blocks written so far, by index."""
        return {i: self.path(i) for i in range(self.rack.n_blocks) if self.path(i).is_file()}

    def _set(self, index: int, block: nn.Module) -> None:
        replace_block(self.rack, index, block)
        self.resident.add(index)
        self.on_replace(index, block)

    def bring_in(self, index: int) -> nn.Module:
        """Block `index` in memory on the device: as it is, from its file, or freshly drawn."""
        block = self.rack.blocks[index]
        if not block_is_meta(block):
            return block
        fresh = self._load(index).to(self.device)
        self._set(index, fresh)
        return fresh

    def _load(self, index: int) -> nn.Module:
        """Block `index` from its file, or with its seeded initial weights, frozen as declared."""
        path = self.path(index)
        template = self.rack.blocks[index]
        fresh = load_block(template, path) if path.is_file() else self.seeded.block(index)
        if declared_frozen(self.rack, index):
            fresh.freeze()
        return fresh

    def put_away(self, index: int) -> None:
        """Write block `index` to its file (when in memory) and drop it from memory."""
        self.resident.discard(index)
        block = self.rack.blocks[index]
        if block_is_meta(block):
            return
        save_block(block, self.path(index))
        release_block(block)
        return_freed_memory()

    def discard_pieces(self) -> None:
        """Remove every piece file (after `write_rack`, where nothing will resume from them)."""
        for path in self.saved().values():
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def borrow(self, index: int) -> Iterator[nn.Module]:
        """Block `index` for a frozen forward; dropped again afterwards when it was away."""
        block = self.rack.blocks[index]
        if not block_is_meta(block):
            yield block
            return
        loaded = self._load(index).to(self.device).eval()
        try:
            yield loaded
        finally:
            del loaded

    def write_rack(self, folder: str | Path) -> Path:
        """The trained rack as sharded safetensors in `folder` (every block put away first)."""
        for index in range(self.rack.n_blocks):
            if block_is_meta(self.rack.blocks[index]) and not self.path(index).is_file():
                save_block(self.seeded.block(index), self.path(index))  # never trained
            self.put_away(index)
        return write_sharded_rack(self.rack, self.saved(), folder)
