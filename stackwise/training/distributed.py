"""One training run over several processes (torchrun): data parallelism for the trainer.

`ArchitectureTrainer` trains on one device per process. Started under ``torchrun`` with the
process group initialised (`init_process_group`), every process (rank) runs the same trainer on
the same config, and `Distributed` is what makes them one run:

1. Every rank reads the same data stream and draws the same corruption for every batch, then
   keeps its rows ``[rank::world]`` (`Distributed.shard`): the global batch is the
   `training.batch_size` of the config, which must divide by the world size, so every shard has
   the same number of rows. The sample pool of depth-wise stages is sharded the same way, so the
   activation cache of each rank holds its own rows only.
2. The trainable forward of a stage (the piece and the readout, or the whole rack) is wrapped in
   `DistributedDataParallel` (`Distributed.wrap`); the frozen parameters and all buffers are
   ignored by it, so the frozen trunk is never wrapped, synchronised or given gradients.
3. Each rank's loss is rescaled by its share of the global loss denominator
   (`Distributed.global_loss`): DDP averages gradients over ranks, which then equals the gradient
   of the global batch's mean loss, also when ranks hold different numbers of target tokens
   (masked or padded batches). Step losses, token counts and FLOPs are summed over ranks, so what
   rank 0 reports is the run's, not its shard's.
4. Rank 0 alone emits callbacks (metrics, MLflow) and writes checkpoints; every rank resumes
   from the same checkpoint folder, so a run resumes with the same world size (and, across
   nodes, needs that folder on a shared filesystem).

Outside ``torchrun`` (or with a world of one) `Distributed.current()` is a world of one whose
methods change nothing, and the single-process trainer runs exactly as it did before.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stackwise.training.objectives import IGNORE_INDEX, Corruption, Objective

# How long a rank waits for the others in one collective (a rank 0 busy logging a model, a slow
# first step) before the run fails.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a ``torchrun`` launch (its environment says so)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_process_group(device_type: str) -> Distributed:
    """Join the process group ``torchrun`` set up in the environment: nccl on CUDA (each rank
    on GPU ``LOCAL_RANK``), gloo on the CPU. Returns this process's `Distributed`."""
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return Distributed.current()


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_CONTROL_GROUP: Any = None


def _control_group() -> Any:
    """A gloo group for small control messages (CPU tensors whatever the training backend)."""
    global _CONTROL_GROUP
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = (
            dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        )
    return _CONTROL_GROUP


def broadcast_json(message: Any | None, src: int = 0) -> Any:
    """`message` (JSON-serialisable, given on rank `src`) on every rank. JSON, never pickle:
    what a rank receives is data, not code."""
    group = _control_group()
    if dist.get_rank() == src:
        payload = json.dumps(message).encode("utf-8")
        size = torch.tensor([len(payload)], dtype=torch.int64)
    else:
        payload = b""
        size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=src, group=group)
    if dist.get_rank() == src:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    else:
        data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src=src, group=group)
    return json.loads(bytes(data.tolist()).decode("utf-8"))


def loss_denominator(objective: Objective, batch: Corruption) -> int:
    """What `objective.loss` divides its summed token losses by for `batch`: the target
    positions of a mean cross-entropy, the real tokens of a diffusion batch."""
    if objective.name == "diffusion":
        mask = batch.attention_mask
        return batch.targets.numel() if mask is None else int(mask.sum())
    return int((batch.targets != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: `rank` of `world` (a world of one outside torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> Distributed:
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that reports, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: GPU ``LOCAL_RANK`` when the run trains on CUDA."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def check_batch_size(self, batch_size: int) -> str | None:
        """Why `batch_size` cannot be split into equal shards (None when it can)."""
        if batch_size % self.world:
            return (
                f"training.batch_size {batch_size} does not divide by the {self.world} processes "
                f"of the run: each process trains on an equal share of every batch"
            )
        return None

    def shard(self, batch: Corruption) -> Corruption:
        """This rank's rows ``[rank::world]`` of a batch (the batch itself in a world of one)."""
        if not self.active:
            return batch
        rows = slice(self.rank, None, self.world)
        return Corruption(
            batch.inputs[rows],
            batch.targets[rows],
            None if batch.weights is None else batch.weights[rows],
            None if batch.attention_mask is None else batch.attention_mask[rows],
        )

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` in `DistributedDataParallel` over its trainable parameters only: frozen
        parameters and buffers are left out of it (never broadcast, never all-reduced)."""
        from torch.nn.parallel import DistributedDataParallel

        ignored = [name for name, p in module.named_parameters() if not p.requires_grad]
        ignored += [name for name, _ in module.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
        first = next((p for p in module.parameters() if p.requires_grad), None)
        on_cuda = first is not None and first.device.type == "cuda"
        return DistributedDataParallel(
            module,
            device_ids=[first.device.index] if on_cuda and first is not None else None,
        )

    def no_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Within a step's micro-batches DDP all-reduces gradients at the last one only."""
        if not self.active or last:
            return contextlib.nullcontext()
        return model.no_sync()  # type: ignore[operator]

    def global_loss(
        self, loss: torch.Tensor, objective: Objective, batch: Corruption, tokens: int
    ) -> tuple[torch.Tensor, int]:
        """(this rank's loss rescaled so that DDP's mean of the gradients is the gradient of the
        global batch's mean loss, the global batch's training tokens)."""
        counts = torch.tensor(
            [loss_denominator(objective, batch), tokens], dtype=torch.float64, device=loss.device
        )
        local = counts[0].clone()
        dist.all_reduce(counts)
        scale = local * self.world / counts[0].clamp_min(1.0)
        return loss * scale.to(loss.dtype), int(counts[1].item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over ranks (a rescaled loss's mean is the global batch's loss)."""
        if not self.active:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world
