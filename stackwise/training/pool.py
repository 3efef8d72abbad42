"""The sample pool of the depth-wise stages and the activation caches of the frozen trunk.

Depth-wise stages with ``depthwise.data: pool`` visit a fixed pool: the first ``max(stage
steps) x grad_accum`` micro-batches of the data stream, corrupted once (mlm/diffusion masks
drawn from a seeded generator). Every stage trains on it in the same order, so the frozen
trunk's output is computed once per sample and kept in an `ActivationCache`, extended one
piece at a time as stages end; the validation batches get a cache of their own.

`SamplePool` draws the pool (`draw`), brings the caches up to a stage (`prepare`), hands out
micro-batches with their cached trunk output (`read`) and closes both caches (`close`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from stackwise.config.base import StackWiseConfig
from stackwise.training.cache import ActivationCache, storage_dtype
from stackwise.training.distributed import Distributed
from stackwise.training.flops import forward_flops_per_token
from stackwise.training.memory import cache_memory_allowance
from stackwise.training.objectives import Corruption, Objective
from stackwise.training.stages import StagePlan, pool_micro_batches
from stackwise.training.stream import BatchStream
from stackwise.training.trunk import FrozenTrunk

#: counts FLOPs executed (the running stage's `StageMeter.add_flops`)
AddFlops = Callable[[float], None]


def stage_boundaries(plans: Sequence[StagePlan], plan: StagePlan) -> list[int]:
    """Trunk ends the cache goes through up to `plan`, in order (so a cache rebuilt after a
    resume replays the extensions of the stages before it)."""
    return [p.start for p in plans[: plan.index + 1] if p.depthwise and not p.trains_embedding]


class SamplePool:
    """The pool, its activation cache and the validation cache of one run.

    `out_of_core` runs keep the caches in memory-mapped files whatever their size; `directory`
    is where a spilled cache goes (None: ``cache.directory``, else a temporary folder).
    """

    def __init__(
        self,
        config: StackWiseConfig,
        plans: list[StagePlan],
        loader: Iterable[Any],
        objective: Objective,
        trunk: FrozenTrunk,
        dist: Distributed,
        *,
        directory: Path | None = None,
        out_of_core: bool = False,
    ) -> None:
        self.config = config
        self.cfg = config.training
        self.plans = plans
        self.loader = loader
        self.objective = objective
        self.trunk = trunk
        self.dist = dist
        self.directory = directory
        self.out_of_core = out_of_core
        self.use_cache = self.cfg.cache.enabled
        self.batches: list[Corruption] | None = None
        self.cache: ActivationCache | None = None
        self.val_cache: ActivationCache | None = None
        self._eval_entries: Sequence[Corruption] = ()

    # -- the pool ----------------------------------------------------------------------------

    def draw(self, start: tuple[int, int]) -> tuple[BatchStream, int]:
        """Draw the pool from the data position `start`, from a stream of its own; returns
        that stream (positioned after the pool) and the pool's tokens read for the first time.

        The pool is complete before anything changes: a Ctrl-C while drawing leaves the
        caller's stream where it was, so a resumed run draws the same pool.
        """
        stream = BatchStream(self.loader, *start)
        generator = torch.Generator().manual_seed(self.cfg.seed + 1)
        pool = []
        unique = 0
        for _ in range(pool_micro_batches(self.plans, self.cfg.grad_accum_steps)):
            ids, mask, new = stream.take()
            unique += new
            pool.append(self.dist.shard(self.objective.corrupt(ids, generator, mask)))
        self.batches = pool
        return stream, unique

    def read(self, plan: StagePlan, index: int) -> tuple[Corruption, torch.Tensor | None]:
        """Micro-batch `index` of the pool on the device, and the frozen trunk's output for it
        when the cache holds it (None: the stage has no trunk, or the trunk must run)."""
        assert self.batches is not None
        batch = self.batches[index].to(self.trunk.device)
        if plan.trains_embedding:
            return batch, None
        if self.cache is not None and self.cache.prefix_end == plan.start:
            return batch, self.cache.read(index)
        return batch, None

    # -- the caches --------------------------------------------------------------------------

    def caching(self, plan: StagePlan) -> bool:
        """Whether `plan` reads its trunk's output from the cache."""
        return self.use_cache and not plan.trains_embedding

    def prepare(
        self, plan: StagePlan, eval_entries: Sequence[Corruption], add_flops: AddFlops
    ) -> None:
        """Bring the activation cache (and the validation cache of `eval_entries`) up to the
        blocks before `plan.start`, counting the FLOPs of the pool's extensions."""
        if not self.caching(plan):
            return
        assert self.batches is not None
        if self.cache is None:
            seq_len = self.batches[0].inputs.shape[1]
            if any(b.inputs.shape[1] != seq_len for b in self.batches) or any(
                b.inputs.shape[1] != seq_len for b in eval_entries
            ):
                warnings.warn(
                    "sequences of different lengths: the activation cache is off", stacklevel=3
                )
                self.use_cache = False
                return
            # What the caches may hold in memory (`cache.location: auto`) so that this run
            # needs no more than rackwise training of the rack: the rest spills to disk. Out of
            # core the caches are on disk whatever their size: nothing to estimate.
            allowance = 0
            if not self.out_of_core:
                pool_bytes = sum(
                    t.untyped_storage().nbytes()
                    for b in self.batches
                    for t in (b.inputs, b.targets, b.weights, b.attention_mask)
                    if t is not None
                )
                allowance = cache_memory_allowance(
                    self.config, self.plans, self.trunk.rack, self.trunk.device, pool_bytes
                )
            self.cache = self._new_cache([b.inputs.shape[0] for b in self.batches], allowance)
            self._eval_entries = eval_entries
            if eval_entries:
                rows = [b.inputs.shape[0] for b in eval_entries]
                allowance -= self.cache.memory_bytes
                self.val_cache = self._new_cache(rows, allowance)
        for boundary in stage_boundaries(self.plans, plan):
            self._advance(boundary, add_flops)

    def _new_cache(self, rows: list[int], allowance: int) -> ActivationCache:
        """A cache of `rows`; spilled beside the checkpoints when it does not fit `allowance`."""
        assert self.batches is not None
        directory = self.cfg.cache.directory
        if directory is None and self.directory is not None:
            directory = str(self.directory)
        return ActivationCache(
            rows,
            self.batches[0].inputs.shape[1],
            int(self.trunk.rack.d_model),  # type: ignore[arg-type]
            device=self.trunk.device,
            dtype=storage_dtype(self.cfg.cache.dtype),
            # Out of core the cache is a memory-mapped file whatever its size.
            location="disk" if self.out_of_core else self.cfg.cache.location,
            max_memory_gb=self.cfg.cache.max_memory_gb,
            directory=directory,
            allowance_bytes=allowance,
        )

    def _advance(self, end: int, add_flops: AddFlops) -> None:
        """Both caches through block `end`: filled from the token ids, or extended over the
        blocks frozen since."""
        assert self.cache is not None and self.batches is not None
        trunk = self.trunk
        pairs = [(self.cache, self.batches)]
        if self.val_cache is not None:
            pairs.append((self.val_cache, list(self._eval_entries)))
        for cache, batches in pairs:
            if not cache.filled:
                cache.fill(lambda i, b=batches: trunk.output(b[i].to(trunk.device), end), end)  # type: ignore[misc]
                begin = 0
            elif cache.prefix_end < end:
                begin = cache.prefix_end

                def apply(
                    h: torch.Tensor, i: int, b: list[Corruption] = batches, begin: int = begin
                ) -> torch.Tensor:
                    return trunk.extend(h, begin, end, b[i].attention_mask)

                cache.extend(apply, end)
            else:
                continue
            if cache is self.cache:  # every rank's share of the pool (torchrun)
                tokens = sum(b.inputs.numel() for b in batches) * self.dist.world
                seq = batches[0].inputs.shape[1]
                add_flops(forward_flops_per_token(trunk.rack, begin, end, seq) * tokens)

    @property
    def prefix_end(self) -> int:
        """Blocks the pool's cached activations have gone through (0 without a cache)."""
        return 0 if self.cache is None else self.cache.prefix_end

    def storages(self) -> list[torch.Tensor]:
        """The tensors the caches hold (a micro-batch read from one in memory is a view)."""
        return [c.storage for c in (self.cache, self.val_cache) if c is not None]

    def metrics(self) -> dict[str, float]:
        """The pool cache's size and place (for a stage's result), when there is one."""
        if self.cache is None:
            return {}
        return {
            "cache_bytes": float(self.cache.size_bytes),
            "cache_on_disk": float(self.cache.location == "disk"),
        }

    def memory_bytes(self) -> tuple[int, int]:
        """Bytes both caches hold in memory, and on disk."""
        caches = [c for c in (self.cache, self.val_cache) if c is not None]
        return sum(c.memory_bytes for c in caches), sum(c.disk_bytes for c in caches)

    def close(self) -> None:
        """Close both caches (a disk cache deletes its file); the pool itself stays."""
        for cache in (self.cache, self.val_cache):
            if cache is not None:
                cache.close()
        self.cache = self.val_cache = None
