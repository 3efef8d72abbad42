"""The frozen trunk of a depth-wise stage: the blocks below the piece being trained.

`FrozenTrunk` runs and holds those blocks:

1. *Forward* without gradients (`output`: embedding and blocks ``[0, end)`` of a batch;
   `run`: blocks ``[begin, end)`` on hidden states, as extending the activation cache does),
   each block in its own dtype and device, under the run's autocast.
2. *Precision*: with ``training.frozen_precision`` bf16/fp16 a frozen block is held in that
   dtype, with int8 its linear layers are quantized weight-only (`stackwise.model.quantized`,
   about the time of fp32); its fp32 weights
   are kept on the CPU and come back bitwise (`restore`), for the checkpoint (`weights`) and
   at the end of the run.
3. *Offload*: with ``training.offload_frozen`` frozen blocks wait on the CPU while an
   accelerator trains.
4. *Out of core* (``training.out_of_core``, `stackwise.training.pieces.PieceStore`): a stage's
   blocks come into memory when it starts, the blocks the activation cache has moved past are
   put away, and a block that is away is loaded for a forward pass only.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from stackwise.model.materialize import block_is_meta
from stackwise.model.quantized import Int8Linear, quantize_linear_int8
from stackwise.training.cache import storage_dtype
from stackwise.training.errors import TrainingError
from stackwise.training.objectives import Corruption
from stackwise.training.pieces import PieceStore


class FrozenTrunk:
    """The frozen blocks of a run's rack (see the module docstring).

    `precision` is ``training.frozen_precision``; `autocast_dtype` the run's mixed precision
    (None: none); `pieces` the out-of-core store, else None.
    """

    def __init__(
        self,
        rack: nn.Module,
        device: torch.device,
        *,
        precision: str = "fp32",
        offload: bool = False,
        autocast_dtype: torch.dtype | None = None,
        pieces: PieceStore | None = None,
    ) -> None:
        self.rack = rack
        self.device = device
        self.precision = precision
        self.offload = offload
        self.autocast_dtype = autocast_dtype
        self.pieces = pieces
        self.lowered: dict[int, dict[str, torch.Tensor]] = {}  # fp32 weights of lowered blocks
        self.offloaded: set[int] = set()

    @property
    def blocks(self) -> list[nn.Module]:
        """The rack's blocks now (out of core, a block put away or brought in is a new module)."""
        return list(getattr(self.rack, "blocks"))  # noqa: B009

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- forward -----------------------------------------------------------------------------

    def run(self, h: torch.Tensor, begin: int, end: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Frozen blocks [begin, end) on hidden states, without gradients, each in its own
        dtype and device (the caller chooses the autocast)."""
        with torch.no_grad():
            for index in range(begin, end):
                with self.block(index) as block:
                    param = next(block.parameters())
                    if param.dtype != torch.float32 or param.device != h.device:
                        block_mask = None if mask is None else mask.to(param.device)
                        out = block(h.to(param.device, param.dtype), block_mask)
                        h = out.to(self.device, torch.float32)
                    else:
                        h = block(h, mask)
        return h

    def extend(
        self, h: torch.Tensor, begin: int, end: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """`run` under the run's autocast, the mask moved to the device (a cache extension)."""
        with self.autocast():
            return self.run(h, begin, end, None if mask is None else mask.to(self.device))

    def output(self, batch: Corruption, end: int) -> torch.Tensor:
        """The trunk's output (embedding + blocks [0, end)) for a corrupted batch."""
        with torch.no_grad(), self.autocast():
            h = self.rack.embed(batch.inputs)  # type: ignore[operator]
            return self.run(h.float(), 0, end, batch.attention_mask)

    def block(self, index: int) -> contextlib.AbstractContextManager[nn.Module]:
        """Block `index` for a forward pass; out of core, loaded for the pass when away."""
        if self.pieces is None:
            return contextlib.nullcontext(self.blocks[index])
        return self.pieces.borrow(index)

    # -- precision and offload ---------------------------------------------------------------

    def freeze_below(self, start: int) -> None:
        """Hold the blocks below `start` in ``frozen_precision`` (in memory runs only)."""
        if self.pieces is not None:
            return
        for index in range(start):
            self._lower(index)

    def _lower(self, index: int) -> None:
        """Hold frozen block `index` in frozen_precision (its fp32 weights kept on the CPU):
        bf16/fp16 weights, or int8 weight-only linear layers."""
        if self.precision == "fp32" or index in self.lowered:
            return
        block = self.blocks[index]
        self.lowered[index] = {
            k: v.detach().to("cpu", copy=True) for k, v in block.state_dict().items()
        }
        if self.precision == "int8":
            quantize_linear_int8(block)
        else:
            block.to(storage_dtype(self.precision))

    def offload_below(self, start: int) -> None:
        """With ``offload_frozen`` on an accelerator, the blocks below `start` wait on the CPU."""
        if not self.offload or self.device.type == "cpu":
            return
        for index in range(start):
            if index not in self.offloaded:
                self.blocks[index].to("cpu")
                self.offloaded.add(index)

    def restore(self) -> None:
        """Every lowered block back in fp32 with its exact weights, every block on the device."""
        blocks = self.blocks
        for index, state in self.lowered.items():
            block = blocks[index]
            for name, module in block.named_modules():  # quantized weights become plain again
                if isinstance(module, Int8Linear):
                    module.to_linear(state[f"{name}.weight"].to(self.device))
            block.to(device=self.device, dtype=torch.float32)
            block.load_state_dict(state)
        self.lowered.clear()
        for index in self.offloaded:
            blocks[index].to(self.device)
        self.offloaded.clear()

    def state_of(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index`'s weights at full precision."""
        return self.lowered.get(index) or self.blocks[index].state_dict()

    def weights(self) -> dict[str, torch.Tensor]:
        """The rack's weights with frozen blocks at full precision (out of core: what is in
        memory; blocks that are away are in their piece files)."""
        state = {k: v for k, v in self.rack.state_dict().items() if not v.is_meta}
        prefixes = self._prefixes()
        for index, block_state in self.lowered.items():
            for key, value in block_state.items():
                state[f"{prefixes[index]}{key}"] = value
        return state

    def _prefixes(self) -> list[str]:
        """The state-dict prefix of every block (``stacks.0.blocks.1.``)."""
        names = {id(m): n for n, m in self.rack.named_modules()}
        return [names[id(b)] + "." for b in self.blocks]

    # -- out of core -------------------------------------------------------------------------

    def bring_in(self, start: int, end: int) -> None:
        """Out of core: blocks [start, end) in memory."""
        if self.pieces is None:
            return
        for index in range(start, end):
            self.pieces.bring_in(index)

    def put_away(self, end: int) -> None:
        """Out of core: blocks [0, end), which the activation cache has moved past, leave
        memory."""
        if self.pieces is None:
            return
        for index in sorted(i for i in self.pieces.resident if i < end):
            self.pieces.put_away(index)

    def load_out_of_core(self, weights: dict[str, torch.Tensor], where: object) -> None:
        """Out of core: blocks `weights` holds come into memory and take its weights; the others
        stay away (in their piece files, or not drawn yet). `where` names the checkpoint."""
        assert self.pieces is not None
        prefixes = self._prefixes()
        for index, prefix in enumerate(prefixes):
            if any(key.startswith(prefix) for key in weights):
                self.pieces.bring_in(index)
        missing, unexpected = self.rack.load_state_dict(weights, strict=False)
        away = [p for p, b in zip(self._prefixes(), self.blocks, strict=True) if block_is_meta(b)]
        kept = [k for k in missing if not any(k.startswith(p) for p in away)]
        if unexpected or kept:
            raise TrainingError(
                f"the checkpoint in {where} does not match the rack "
                f"(unexpected {unexpected[:3]}, missing {kept[:3]})"
            )
