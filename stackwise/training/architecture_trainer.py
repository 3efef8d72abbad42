"""The trainer: rackwise, stackwise, blockwise (layerwise) and progressive training of a Rack.

`ArchitectureTrainer(config).train_architecture(rack, dataloader)` runs the stages planned by
`stackwise.training.stages.plan_stages` and returns `TrainingResults`. The algorithm, per stage:

1. Freeze everything, then unfreeze what the stage trains. A depth-wise stage k trains piece k
   (a stack or a block) and the readout (final norm + LM head); the embedding is trained only in
   the stage that starts at block 0, because the frozen trunk's cached output depends on it.
   With ``depthwise.head: untie`` (the default) a tied LM head gets its own weight, copied from
   the embedding, before training starts, so every stage trains a head (``fresh``: each stage
   starts from a new copy of the embedding; ``frozen``: the head stays the embedding and is
   trained in the first stage only). ``depthwise.init: copy_previous`` starts piece k as a copy
   of trained piece k-1. A progressive stage trains the first n stacks end to end and first
   initialises the stacks it adds (``growth.init``: copy the last, duplicate the middle, copy the
   whole trunk when doubling, or keep the seeded weights). Frozen parameters have
   ``requires_grad=False``, are in eval mode and are not given to the optimizer, so they stay
   bitwise unchanged. Blocks after the trained range are not run: the readout follows it.
2. Depth-wise stages with ``depthwise.data: pool`` visit a fixed *sample pool*: the first
   ``max(stage steps) x grad_accum`` micro-batches of the data stream, corrupted once
   (mlm/diffusion masks drawn from a seeded generator when the pool is drawn). Every stage trains
   on this pool in the same order (a shorter stage uses its beginning); that is what lets the
   frozen trunk's output be computed once per sample (`stackwise.training.cache`) and extended
   one piece at a time. With ``data: fresh`` every stage reads new batches and the frozen trunk
   runs on each. The trunk runs under ``no_grad`` (or comes from the cache), so backward stops at
   the piece. Cached and uncached training compute the same losses.
3. The rackwise, progressive and fusion stages read the data stream directly (corruption drawn
   per batch from a seeded generator) and train every parameter in their range not declared
   frozen.
4. A training step (`_train_step`): forward and backward over the micro-batches, AdamW with a
   warmup/decay schedule per stage, clipping, bf16/fp16 autocast and TF32 on CUDA, optional
   ``torch.compile``. A `StageMeter` counts the stage's tokens, executed FLOPs (trainable piece
   3x forward, trunk forward where it runs, cache building) and training seconds (steps and
   cache building only, so tokens/s and MFU exclude evaluation and checkpoints).
5. Per-step hooks (`_after_step`): FAVOR+ projections redrawn when due
   (``kernel.redraw_every``), metrics every ``log_every_steps`` (with the run's tokens and FLOPs
   so far), validation every ``eval.every_steps``, checkpoints every ``checkpoint.every_steps``
   or ``checkpoint.every_minutes``; at the stage end, validation, the `StageResult` and a
   checkpoint.

Faults: a non-finite loss raises `TrainingError` naming the stage and step; CUDA out-of-memory
raises `TrainingError` naming the stage and what to change; Ctrl-C (KeyboardInterrupt) writes a
checkpoint (when a checkpoint directory is set) and re-raises. Resuming restores weights,
optimizer, scheduler, fp16 loss scale, RNG states, data position, stage, step and the meter; the
pool and the cache are rebuilt deterministically.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stackwise.config.base import BYTE_VOCAB_SIZE, StackWiseConfig
from stackwise.data.tokenizer import special_ids_for
from stackwise.model.attention import KernelAttention, redraw_kernel_features
from stackwise.model.materialize import block_is_meta
from stackwise.training.cache import ActivationCache, storage_dtype
from stackwise.training.callbacks import StageInfo, StageResult, TrainingCallback, TrainingResults
from stackwise.training.checkpoint import load_checkpoint, save_checkpoint
from stackwise.training.device import resolve_device
from stackwise.training.distributed import Distributed
from stackwise.training.flops import forward_flops_per_token, train_flops_per_token
from stackwise.training.memory import cache_memory_allowance
from stackwise.training.meter import StageMeter
from stackwise.training.metrics import (
    MemoryReport,
    PeakMemory,
    SavedActivations,
    TrainingMemory,
    device_peak_flops,
    measure_training_memory,
)
from stackwise.training.objectives import CausalLM, Corruption, Objective, build_objective
from stackwise.training.optim import build_optimizer, build_scheduler
from stackwise.training.pieces import PieceStore
from stackwise.training.stages import (
    StagePlan,
    eligible_parameters,
    plan_stages,
    pool_micro_batches,
    prepare_rack,
    trainable_parameters,
)

_BYTE_MASK_ID = 257
_OOM_ERRORS: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
)


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, out of memory, unusable checkpoint or data)."""


# --------------------------------------------------------------------------------------------
# data stream
# --------------------------------------------------------------------------------------------


def _is_padding_mask(mask: Any, ids: torch.Tensor) -> bool:
    return (
        isinstance(mask, torch.Tensor)
        and mask.shape == ids.shape
        and bool(((mask == 0) | (mask == 1)).all())
    )


# Seed of the masks drawn for the test data (mlm, diffusion): fixed, so every run of a
# comparison is tested on the same corrupted batches whatever its training seed.
TEST_MASK_SEED = 7919


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def quantize_int8(module: nn.Module) -> None:
    """Int8 weight-only quantization of `module`'s linear layers (torchao), in place."""
    import logging

    # torchao reports optional GPU kernels it cannot load, and torch a deprecation, on import;
    # neither concerns weight-only int8.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    quantize_(module, Int8WeightOnlyConfig())


_MEMORY_KEYS = ("training_memory_bytes", "cache_memory_bytes", "cache_disk_bytes")


def _largest_memory(stages: list[StageResult]) -> dict[str, float]:
    """A run's memory in parts: the largest of its stages' (where they were measured)."""
    return {
        key: max(s.extra[key] for s in stages if key in s.extra)
        for key in _MEMORY_KEYS
        if any(key in s.extra for s in stages)
    }


def _token_count(ids: torch.Tensor, mask: torch.Tensor | None) -> int:
    """Training tokens of a batch: every position, or the real ones under a padding mask."""
    return ids.numel() if mask is None else int(mask.sum())


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
            return _unpack(batch)
        raise TrainingError("the training dataloader yields no batches")


# --------------------------------------------------------------------------------------------
# the forward of one stage
# --------------------------------------------------------------------------------------------


class StageForward(nn.Module):
    """Logits of a stage: (embed or given trunk output) -> blocks [start, end) -> readout."""

    def __init__(self, rack: nn.Module, start: int, end: int) -> None:
        super().__init__()
        self.rack = rack
        self.start = start
        self.end = end

    def forward(
        self,
        inputs: torch.Tensor,
        hidden: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.rack.embed(inputs) if hidden is None else hidden  # type: ignore[operator]
        h = self.rack.forward_blocks(h, self.start, self.end, attention_mask)  # type: ignore[operator]
        return self.rack.readout(h)  # type: ignore[operator]


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------


class ArchitectureTrainer:
    """Trains a Rack as configured by ``config.training`` (see the module docstring).

    `callbacks` receive progress (`TrainingCallback`); `checkpoint_dir` enables checkpoints and,
    with `resume`, continuing from the newest one; `checkpoint_metadata` is stored inside every
    checkpoint; `mask_token_id` is the [MASK] id for mlm/diffusion (default: the byte
    tokenizer's [MASK] when the rack's vocabulary is 260, else the last id of the vocabulary).
    """

    def __init__(
        self,
        config: StackWiseConfig,
        callbacks: Iterable[TrainingCallback] | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = True,
        checkpoint_metadata: dict[str, str] | None = None,
        mask_token_id: int | None = None,
    ) -> None:
        self.config = config
        self.callbacks = list(callbacks or [])
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.resume = resume
        self.checkpoint_metadata = dict(checkpoint_metadata or {})
        self.mask_token_id = mask_token_id

    def train_architecture(
        self,
        rack: nn.Module,
        dataloader: Iterable[Any],
        eval_dataloader: Iterable[Any] | None = None,
        test_dataloader: Iterable[Any] | None = None,
    ) -> TrainingResults:
        """Train `rack` in place on `dataloader`; evaluate on `eval_dataloader` when given.

        `test_dataloader` (held-out test data) is read once, after training: every batch of it
        gives the final ``test/loss`` (`TrainingResults.final_test_loss`); nothing during
        training sees it.
        """
        run = _Run(self, rack, dataloader, eval_dataloader)
        run.test_dataloader = test_dataloader
        return run.execute()


class _Run:
    """State of one `train_architecture` call."""

    def __init__(
        self,
        trainer: ArchitectureTrainer,
        rack: nn.Module,
        dataloader: Iterable[Any],
        eval_dataloader: Iterable[Any] | None,
    ) -> None:
        self.trainer = trainer
        self.config = trainer.config
        self.cfg = trainer.config.training
        self.rack = rack
        self.device = resolve_device(self.cfg.device)
        # -- distributed (torchrun; `stackwise.training.distributed`): this process's rank in
        # the run. A world of one (no process group) changes nothing below.
        self.dist = Distributed.current()
        self.device = self.dist.device(self.device)
        if self.dist.active:
            problem = self.dist.check_batch_size(self.cfg.batch_size)
            if problem is None and self.cfg.out_of_core:
                problem = "training.out_of_core trains in one process; run it without torchrun"
            if problem is not None:
                raise TrainingError(problem)
        # -- end distributed
        self.dataloader = dataloader
        self.eval_dataloader = eval_dataloader
        self.test_dataloader: Iterable[Any] | None = None
        vocab = int(rack.vocab_size)  # type: ignore[arg-type]
        mask_id = trainer.mask_token_id
        if mask_id is None:
            mask_id = _BYTE_MASK_ID if vocab == BYTE_VOCAB_SIZE else vocab - 1
        self.objective: Objective = build_objective(
            self.cfg.objective,
            vocab_size=vocab,
            mask_token_id=mask_id,
            mlm_probability=self.cfg.mlm_probability,
            special_ids=special_ids_for(vocab, mask_id),
            t_min=self.cfg.mask_ratio_min,
            t_max=self.cfg.mask_ratio_max,
            eval_points=self.cfg.eval.diffusion_t_points,
        )
        if self.cfg.objective == "clm" and not bool(rack.is_causal):
            warnings.warn(
                "training.objective is clm but the rack has bidirectional blocks: they can see "
                "the token they predict; use causal attention or objective mlm/diffusion",
                stacklevel=3,
            )
        self.blocks: list[nn.Module] = list(getattr(rack, "blocks"))  # noqa: B009
        self.pieces: PieceStore | None = None
        if self.cfg.out_of_core:
            # Draws the embedding and readout of a rack built on the meta device (before the
            # head is untied: the draws follow the rack as it was built).
            self.pieces = PieceStore(
                rack,  # type: ignore[arg-type]
                self._pieces_folder(),
                self.device,
                self._block_replaced,
            )
        prepare_rack(self.config, rack)  # a depth-wise run's head gets its own weight
        self.eligible = eligible_parameters(rack)
        self.requires_grad = {id(p): p.requires_grad for p in rack.parameters()}
        self.was_training = rack.training
        self.plans = plan_stages(self.config, rack)
        self.pooled = self.cfg.depthwise.data == "pool"  # depth-wise stages share one pool
        self.use_cache = self.cfg.cache.enabled
        self.autocast_dtype: torch.dtype | None = None
        if self.device.type == "cuda" and self.cfg.precision != "fp32":
            self.autocast_dtype = storage_dtype(self.cfg.precision)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.device.type == "cuda" and self.cfg.precision == "fp16"
        )
        self.memory = PeakMemory(self.device)
        self.peak_flops = device_peak_flops(self.device, self.cfg.precision)

        # Position of the run (saved in checkpoints).
        self.stage_index = 0
        self.step_in_stage = 0
        self.global_step = 0
        self.total_tokens = 0
        self.total_flops = 0.0
        self.unique_tokens = 0  # distinct training tokens read from the data (first pass)
        self.previous_wall = 0.0
        self.meter = StageMeter()
        self.stage_memory: TrainingMemory | None = None  # measured on the stage's first step
        self.stage_results: list[StageResult] = []
        self.last_logged_loss = math.nan
        self.loss_window: list[float] = []
        self.stream = BatchStream(dataloader)
        self.stream_generator = torch.Generator().manual_seed(self.cfg.seed + 3)
        self.pool_start: tuple[int, int] | None = None

        self.pool: list[Corruption] | None = None
        self.cache: ActivationCache | None = None
        self.val_cache: ActivationCache | None = None
        self.eval_entries: list[Corruption] = []
        self.eval_raw: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.lowered: dict[int, dict[str, torch.Tensor]] = {}
        self.offloaded: set[int] = set()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.pending_optimizer: dict[str, Any] | None = None
        self.pending_scheduler: dict[str, Any] | None = None
        self.step_snapshot: dict[str, Any] | None = None  # state at the start of a running step
        self.run_start = 0.0
        self.last_checkpoint_at = 0.0  # perf_counter of the last checkpoint (checkpoint_due)

    # -- out of core ---------------------------------------------------------------------------

    def _pieces_folder(self) -> Path:
        if self.trainer.checkpoint_dir is not None:
            return self.trainer.checkpoint_dir / "pieces"
        return Path(tempfile.mkdtemp(prefix="stackwise-pieces-"))

    def _block_replaced(self, index: int, block: nn.Module) -> None:
        """A block module was swapped in (out of core): its parameters are new objects."""
        self.blocks = list(getattr(self.rack, "blocks"))  # noqa: B009
        for param in block.parameters():
            self.requires_grad[id(param)] = param.requires_grad
            if param.requires_grad:
                self.eligible.add(id(param))

    def _bring_in(self, plan: StagePlan) -> None:
        """Out of core: the stage's blocks in memory, the finished ones before it put away."""
        if self.pieces is None:
            return
        for index in range(plan.start, plan.end):
            self.pieces.bring_in(index)

    def _put_away_trunk(self, plan: StagePlan) -> None:
        """Out of core: blocks the activation cache has moved past leave memory."""
        if self.pieces is None or self.cache is None:
            return
        for index in range(self.cache.prefix_end):
            self.pieces.put_away(index)

    # -- callbacks ---------------------------------------------------------------------------

    def _emit(self, hook: str, *args: Any) -> None:
        if not self.dist.is_main:  # under torchrun rank 0 alone reports
            return
        for callback in self.trainer.callbacks:
            method = getattr(callback, hook, None)  # callbacks may implement only some hooks
            if method is not None:
                method(*args)

    # -- main --------------------------------------------------------------------------------

    def execute(self) -> TrainingResults:
        # Process-wide switches this run changes, put back however it ends.
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        deterministic = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        try:
            if self.device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            if self.cfg.deterministic:
                if self.device.type == "cuda" and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
                    raise TrainingError(
                        "training.deterministic on CUDA needs the environment variable "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8) set before the process "
                        "starts, as cuBLAS requires for repeatable results"
                    )
                torch.use_deterministic_algorithms(True)
            return self._execute()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])

    def _execute(self) -> TrainingResults:
        torch.manual_seed(self.cfg.seed)
        if self.pieces is None:
            self.rack.to(self.device)
        else:  # blocks move to the device as they come into memory
            for name in ("token_embedding", "norm", "lm_head"):
                self.rack.get_submodule(name).to(self.device)
        if self.trainer.checkpoint_dir is not None and self.trainer.resume:
            self._restore()
        self._build_eval_entries()
        self._emit("on_train_start", [p.info() for p in self.plans])
        self.run_start = time.perf_counter()
        plan: StagePlan | None = None
        try:
            for plan in self.plans[self.stage_index :]:
                self._run_stage(plan)
            plan = None
            results = self._finish()
        except KeyboardInterrupt:
            if self.trainer.checkpoint_dir is not None:
                self._save_checkpoint(interrupted=True)
            raise
        except _OOM_ERRORS as error:
            where = (
                f"stage {plan.name} ({plan.index + 1}/{len(self.plans)})" if plan else "evaluation"
            )
            raise TrainingError(
                f"out of memory on {self.device} in {where} at step {self.global_step + 1}: "
                f"lower training.batch_size (raise training.grad_accum_steps to keep the "
                f"effective batch), set training.precision: bf16, training.frozen_precision: "
                f"bf16, training.cache.location: cpu or disk, or train depth-wise "
                f"(training_architecture: blockwise)"
            ) from error
        finally:
            self._release()
        self._emit("on_train_end", results)
        return results

    def _release(self) -> None:
        """Drop caches, put every piece back on the device in fp32, restore flags and modes."""
        for cache in (self.cache, self.val_cache):
            if cache is not None:
                cache.close()
        self.cache = self.val_cache = None
        self._restore_frozen()
        for param in self.rack.parameters():
            param.requires_grad_(self.requires_grad.get(id(param), param.requires_grad))
        self.rack.train(self.was_training)

    # -- planning the trainable set ------------------------------------------------------------

    def _trainable(self, plan: StagePlan) -> list[nn.Parameter]:
        rack = self.rack
        piecewise = plan.depthwise or plan.kind == "grow"  # a slice of the rack, not all of it
        if piecewise:
            params = trainable_parameters(
                rack, plan.start, plan.end, plan.trains_embedding, self.eligible
            )
        else:
            unique = {id(p): p for p in rack.parameters()}
            params = [p for p in unique.values() if id(p) in self.eligible]
        for param in rack.parameters():
            param.requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        rack.eval()
        if piecewise:
            for block in self.blocks[plan.start : plan.end]:
                block.train()
            rack.norm.train()  # type: ignore[union-attr]
            rack.lm_head.train()  # type: ignore[union-attr]
            if plan.trains_embedding:
                rack.token_embedding.train()  # type: ignore[union-attr]
        else:
            rack.train()
            for stack in rack.stacks:  # type: ignore[union-attr]
                if getattr(stack, "freeze_blocks", False):
                    stack.eval()
        return params

    # -- frozen trunk: precision, offloading, forward ----------------------------------------------

    def _lower(self, index: int) -> None:
        """Hold frozen block `index` in frozen_precision (its fp32 weights kept on the CPU):
        bf16/fp16 weights, or int8 weight-only linear layers (torchao)."""
        precision = self.cfg.frozen_precision
        if precision == "fp32" or index in self.lowered:
            return
        block = self.blocks[index]
        self.lowered[index] = {
            k: v.detach().to("cpu", copy=True) for k, v in block.state_dict().items()
        }
        if precision == "int8":
            quantize_int8(block)
        else:
            block.to(storage_dtype(precision))

    def _restore_frozen(self) -> None:
        for index, state in self.lowered.items():
            block = self.blocks[index]
            for name, module in block.named_modules():  # quantized weights become plain again
                if isinstance(module, nn.Linear):
                    module.weight = nn.Parameter(
                        state[f"{name}.weight"].to(self.device), requires_grad=False
                    )
            block.to(device=self.device, dtype=torch.float32)
            block.load_state_dict(state)
        self.lowered.clear()
        for index in self.offloaded:
            self.blocks[index].to(self.device)
        self.offloaded.clear()

    def _frozen_blocks(
        self, h: torch.Tensor, start: int, end: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Run frozen blocks [start, end) without gradients, each in its own dtype/device."""
        with torch.no_grad():
            for index in range(start, end):
                with self._frozen_block(index) as block:
                    param = next(block.parameters())
                    if param.dtype != torch.float32 or param.device != h.device:
                        block_mask = None if mask is None else mask.to(param.device)
                        out = block(h.to(param.device, param.dtype), block_mask)
                        h = out.to(self.device, torch.float32)
                    else:
                        h = block(h, mask)
        return h

    def _frozen_block(self, index: int) -> contextlib.AbstractContextManager[nn.Module]:
        """Block `index` for a forward pass; out of core, loaded for the pass when away."""
        if self.pieces is None:
            return contextlib.nullcontext(self.blocks[index])
        return self.pieces.borrow(index)

    def _trunk(self, batch: Corruption, end: int) -> torch.Tensor:
        """The frozen trunk's output (embedding + blocks [0, end)) for a corrupted batch."""
        with torch.no_grad(), self._autocast():
            h = self.rack.embed(batch.inputs)  # type: ignore[operator]
            return self._frozen_blocks(h.float(), 0, end, batch.attention_mask)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- pool and cache -------------------------------------------------------------------------

    def _ensure_pool(self) -> None:
        if self.pool is not None:
            return
        n = pool_micro_batches(self.plans, self.cfg.grad_accum_steps)
        fresh = self.pool_start is None
        start = self.stream.position if self.pool_start is None else self.pool_start
        # The pool is drawn from a stream of its own and committed only once complete: a
        # Ctrl-C while drawing then checkpoints the data position of the pool's start, so the
        # resumed run draws the same pool (and its stream continues after it, as this one does).
        stream = BatchStream(self.dataloader, *start)
        generator = torch.Generator().manual_seed(self.cfg.seed + 1)
        pool = []
        unique = 0
        for _ in range(n):
            ids, mask = stream.next()
            if stream.epoch == 0:
                unique += _token_count(ids, mask)
            pool.append(self.dist.shard(self.objective.corrupt(ids, generator, mask)))
        if fresh:
            self.stream = stream
            self.unique_tokens += unique
        self.pool = pool
        self.pool_start = start

    def _stage_boundaries(self, plan: StagePlan) -> list[int]:
        """Trunk ends the cache goes through up to `plan` (so a rebuild replays the same steps)."""
        return [
            p.start for p in self.plans[: plan.index + 1] if p.depthwise and not p.trains_embedding
        ]

    def _prepare_trunk(self, plan: StagePlan) -> None:
        """Bring the activation cache up to the blocks before `plan.start`."""
        if not self.use_cache or plan.trains_embedding:
            return
        assert self.pool is not None
        if self.cache is None:
            seq_len = self.pool[0].inputs.shape[1]
            if any(b.inputs.shape[1] != seq_len for b in self.pool) or any(
                b.inputs.shape[1] != seq_len for b in self.eval_entries
            ):
                warnings.warn(
                    "sequences of different lengths: the activation cache is off", stacklevel=2
                )
                self.use_cache = False
                return
            # What the caches may hold in memory (`cache.location: auto`) so that this run
            # needs no more than rackwise training of the rack: the rest spills to disk.
            pool_bytes = sum(
                t.untyped_storage().nbytes()
                for b in self.pool
                for t in (b.inputs, b.targets, b.weights, b.attention_mask)
                if t is not None
            )
            allowance = cache_memory_allowance(
                self.config, self.plans, self.rack, self.device, pool_bytes
            )
            self.cache = self._new_cache([b.inputs.shape[0] for b in self.pool], seq_len, allowance)
            if self.eval_entries:
                rows = [b.inputs.shape[0] for b in self.eval_entries]
                allowance -= self.cache.memory_bytes
                self.val_cache = self._new_cache(rows, seq_len, allowance)
        for boundary in self._stage_boundaries(plan):
            self._advance_cache(boundary)
        if self.cfg.offload_frozen and self.device.type != "cpu":
            for index in range(plan.start):
                if index not in self.offloaded:
                    self.blocks[index].to("cpu")
                    self.offloaded.add(index)

    def _new_cache(self, rows: list[int], seq_len: int, allowance: int) -> ActivationCache:
        """A cache of `rows`; spilled beside the checkpoints when it does not fit `allowance`."""
        directory = self.cfg.cache.directory
        if directory is None and self.trainer.checkpoint_dir is not None:
            directory = str(self.trainer.checkpoint_dir)
        return ActivationCache(
            rows,
            seq_len,
            int(self.rack.d_model),  # type: ignore[arg-type]
            device=self.device,
            dtype=storage_dtype(self.cfg.cache.dtype),
            # Out of core the cache is a memory-mapped file whatever its size.
            location="disk" if self.pieces is not None else self.cfg.cache.location,
            max_memory_gb=self.cfg.cache.max_memory_gb,
            directory=directory,
            allowance_bytes=allowance,
        )

    def _advance_cache(self, end: int) -> None:
        assert self.cache is not None and self.pool is not None
        pairs = [(self.cache, self.pool)]
        if self.val_cache is not None:
            pairs.append((self.val_cache, self.eval_entries))
        for cache, batches in pairs:
            if not cache.filled:
                cache.fill(lambda i, b=batches: self._trunk(b[i].to(self.device), end), end)  # type: ignore[misc]
                begin = 0
            elif cache.prefix_end < end:
                begin = cache.prefix_end

                def apply(
                    h: torch.Tensor, i: int, b: list[Corruption] = batches, begin: int = begin
                ) -> torch.Tensor:
                    mask = b[i].attention_mask
                    with self._autocast():
                        return self._frozen_blocks(
                            h, begin, end, None if mask is None else mask.to(self.device)
                        )

                cache.extend(apply, end)
            else:
                continue
            if cache is self.cache:  # every rank's share of the pool (torchrun)
                tokens = sum(b.inputs.numel() for b in batches) * self.dist.world
                seq = batches[0].inputs.shape[1]
                self.meter.add_flops(forward_flops_per_token(self.rack, begin, end, seq) * tokens)

    # -- evaluation --------------------------------------------------------------------------

    def _build_eval_entries(self) -> None:
        if self.eval_dataloader is None:
            return
        generator = torch.Generator().manual_seed(self.cfg.seed + 2)
        iter_epoch = getattr(self.eval_dataloader, "iter_epoch", None)
        source = iter_epoch(0, 0) if callable(iter_epoch) else iter(self.eval_dataloader)
        for count, batch in enumerate(source):
            if count >= self.cfg.eval.batches:
                break
            ids, mask = _unpack(batch)
            self.eval_raw.append((ids, mask))
            self.eval_entries.extend(self.objective.eval_corruptions(ids, generator, mask))

    @torch.no_grad()
    def _evaluate(self, plan: StagePlan | None, forward: StageForward | None) -> dict[str, float]:
        """Validation metrics of the model as trained so far (None plan: whole rack); which
        ones, and what they estimate, is the objective's `eval_metrics`."""
        if not self.eval_entries:
            return {}
        modes = {id(m): m.training for m in self.rack.modules()}
        self.rack.eval()
        losses = []
        for index, entry in enumerate(self.eval_entries):
            batch = entry.to(self.device)
            with self._autocast():
                if plan is None or not plan.depthwise:
                    logits = self.rack(batch.inputs, batch.attention_mask)
                else:
                    assert forward is not None
                    hidden = None
                    if not plan.trains_embedding:
                        if self.val_cache is not None and self.val_cache.filled:
                            hidden = self.val_cache.read(index)
                        else:
                            hidden = self._trunk(batch, plan.start)
                    logits = forward(batch.inputs, hidden, batch.attention_mask)
            losses.append(float(self.objective.loss(logits, batch)))
        for module in self.rack.modules():
            module.train(modes[id(module)])
        return self.objective.eval_metrics(losses)

    @torch.no_grad()
    def _evaluate_from_cache(self) -> dict[str, float]:
        """Validation metrics of the whole rack from the validation cache (out of core)."""
        if self.val_cache is None or not self.eval_entries:
            return {}
        n_blocks = len(self.blocks)
        begin = self.val_cache.prefix_end
        self.rack.eval()  # the last trained block is still in hand: no dropout while extending
        if begin < n_blocks:

            def apply(h: torch.Tensor, i: int) -> torch.Tensor:
                mask = self.eval_entries[i].attention_mask
                with self._autocast():
                    return self._frozen_blocks(
                        h, begin, n_blocks, None if mask is None else mask.to(self.device)
                    )

            self.val_cache.extend(apply, n_blocks)
        self.rack.eval()
        losses = []
        for index, entry in enumerate(self.eval_entries):
            batch = entry.to(self.device)
            with self._autocast():
                logits = self.rack.readout(self.val_cache.read(index))  # type: ignore[operator]
            losses.append(float(self.objective.loss(logits, batch)))
        return self.objective.eval_metrics(losses)

    @torch.no_grad()
    def _evaluate_test(self, whole_rack: bool) -> dict[str, float]:
        """``test/*`` metrics of the trained rack over every batch of the test data (masks of
        mlm/diffusion drawn from a fixed seed, the same for every training seed). Out of core
        (`whole_rack` False) the trunk runs block by block from the saved pieces."""
        if self.test_dataloader is None:
            return {}
        self.rack.eval()
        generator = torch.Generator().manual_seed(TEST_MASK_SEED)
        iter_epoch = getattr(self.test_dataloader, "iter_epoch", None)
        source = iter_epoch(0, 0) if callable(iter_epoch) else iter(self.test_dataloader)
        losses = []
        for batch in source:
            ids, mask = _unpack(batch)
            for entry in self.objective.eval_corruptions(ids, generator, mask):
                corrupted = entry.to(self.device)
                with self._autocast():
                    if whole_rack:
                        logits = self.rack(corrupted.inputs, corrupted.attention_mask)
                    else:
                        hidden = self._trunk(corrupted, len(self.blocks))
                        logits = self.rack.readout(hidden)  # type: ignore[operator]
                losses.append(float(self.objective.loss(logits, corrupted)))
        if not losses:
            return {}
        metrics = self.objective.eval_metrics(losses)
        return {f"test/{key.split('/', 1)[1]}": value for key, value in metrics.items()}

    @torch.no_grad()
    def _next_token_perplexity(self) -> float | None:
        if not self.eval_raw or not bool(self.rack.is_causal):
            return None
        self.rack.eval()
        clm = CausalLM()
        losses = []
        for ids, mask in self.eval_raw:
            batch = clm.corrupt(ids, None, mask).to(self.device)
            with self._autocast():
                logits = self.rack(batch.inputs, batch.attention_mask)
            losses.append(float(clm.loss(logits, batch)))
        return math.exp(min(sum(losses) / len(losses), 50.0))

    # -- one stage ---------------------------------------------------------------------------

    def _read_stream(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch of the data stream; counts it as unique while in its first pass."""
        ids, mask = self.stream.next()
        if self.stream.epoch == 0:
            self.unique_tokens += _token_count(ids, mask)
        return ids, mask

    def _micro_batch(self, plan: StagePlan, index: int) -> tuple[Corruption, torch.Tensor | None]:
        """The corrupted micro-batch number `index` of the stage and its trunk output (if any).

        Trunk FLOPs of a batch whose trunk runs now (not read from the cache) are counted here.
        """
        if plan.depthwise and self.pooled:
            assert self.pool is not None
            batch = self.pool[index].to(self.device)
            if plan.trains_embedding:
                return batch, None
            if self.cache is not None and self.cache.prefix_end == plan.start:
                return batch, self.cache.read(index)
        else:
            ids, mask = self._read_stream()
            batch = self.objective.corrupt(ids, self.stream_generator, mask)
            batch = self.dist.shard(batch).to(self.device)  # this rank's rows (torchrun)
            if not plan.depthwise or plan.trains_embedding:
                return batch, None
        trunk = forward_flops_per_token(self.rack, 0, plan.start, batch.inputs.shape[1])
        self.meter.add_flops(trunk * batch.inputs.numel() * self.dist.world)
        return batch, self._trunk(batch, plan.start)

    @torch.no_grad()
    def _init_piece(self, plan: StagePlan) -> None:
        """How a depth-wise piece starts (`depthwise.init`) and the head it trains with
        (`depthwise.head: fresh`); only at the start of a stage, never on a resumed one."""
        if self.step_in_stage > 0:
            return
        if plan.kind == "grow":
            self._grow(plan)
            return
        if not plan.depthwise:
            return
        settings = self.cfg.depthwise
        previous = self.plans[plan.index - 1] if plan.index > 0 else None
        if settings.init == "copy_previous" and previous is not None and previous.depthwise:
            sources = range(previous.start, previous.end)
            for source, target in zip(sources, range(plan.start, plan.end), strict=True):
                state = self.lowered.get(source) or self.blocks[source].state_dict()
                self.blocks[target].load_state_dict(state)
        if settings.head == "fresh" and not plan.trains_embedding:
            head = self.rack.get_parameter("lm_head.weight")
            head.copy_(self.rack.get_parameter("token_embedding.weight"))

    def _grow(self, plan: StagePlan) -> None:
        """Initialise the stacks a progressive stage adds (`training.growth.init`)."""
        if plan.index == 0:
            return
        stacks = list(self.rack.get_submodule("stacks").children())
        old = len(self._stacks_in(self.plans[plan.index - 1]))
        new = len(self._stacks_in(plan))
        init = self.cfg.growth.init
        if init == "random":
            return  # the added stacks keep their seeded initialisation
        if self.cfg.growth.schedule == "doubling":
            # StackBERT / G_stack: the trained trunk is copied on top of itself.
            for offset in range(new - old):
                stacks[old + offset].load_state_dict(stacks[offset % old].state_dict())
            return
        if init == "copy_last":
            stacks[old].load_state_dict(stacks[old - 1].state_dict())
            return
        # copy_middle (MIDAS): the middle trained stack is duplicated in place; the stacks
        # above it move up by one.
        middle = (old - 1) // 2
        for index in range(old, middle + 1, -1):
            stacks[index].load_state_dict(stacks[index - 1].state_dict())
        stacks[middle + 1].load_state_dict(stacks[middle].state_dict())

    def _stacks_in(self, plan: StagePlan) -> list[nn.Module]:
        """The stacks whose blocks lie inside the stage's block range."""
        stacks, first = [], 0
        for stack in self.rack.stacks:  # type: ignore[union-attr]
            n = len(stack.blocks)
            if first + n <= plan.end and first >= plan.start:
                stacks.append(stack)
            first += n
        return stacks

    def _prepare_data(self, plan: StagePlan) -> None:
        """Freeze the trunk below the stage and, for a pooled depth-wise stage, bring the sample
        pool and its activation cache up to the stage's first block."""
        if plan.depthwise:
            if self.pieces is None:
                for index in range(plan.start):
                    self._lower(index)
            if self.pooled:
                self._ensure_pool()
                self._prepare_trunk(plan)
                self._put_away_trunk(plan)
            return
        for cache in (self.cache, self.val_cache):
            if cache is not None:
                cache.close()
        self.cache = self.val_cache = None
        self._restore_frozen()

    def _start_optimizer(self, plan: StagePlan, params: list[nn.Parameter]) -> None:
        self.optimizer = build_optimizer(params, self.cfg.optimizer, plan.lr, self.device)
        schedule = self.cfg.schedule
        rewarm = self.cfg.growth.rewarm_fraction
        if plan.kind == "grow" and plan.index > 0 and rewarm is not None:
            schedule = schedule.model_copy(update={"warmup_fraction": rewarm})
        self.scheduler = build_scheduler(self.optimizer, schedule, plan.steps)
        if self.pending_optimizer is not None:
            self.optimizer.load_state_dict(self.pending_optimizer)
            if self.pending_scheduler is not None:
                self.scheduler.load_state_dict(self.pending_scheduler)
            self.pending_optimizer = self.pending_scheduler = None

    def _train_step(
        self, plan: StagePlan, model: nn.Module, params: list[nn.Parameter]
    ) -> tuple[float, float | None]:
        """One optimizer step (forward, backward over the micro-batches, clip, update).

        Returns the mean loss and the gradient norm before clipping (None without clipping).
        """
        assert self.optimizer is not None and self.scheduler is not None
        accum = self.cfg.grad_accum_steps
        step_loss = torch.zeros((), device=self.device)
        # Training memory is measured on the stage's first step (compiled graphs keep their
        # own saved tensors, so not under torch.compile).
        measure = self.stage_memory is None and not self.cfg.compile
        saved: SavedActivations | None = None
        for micro in range(accum):
            batch, hidden = self._micro_batch(plan, self.step_in_stage * accum + micro)
            tokens = _token_count(batch.inputs, batch.attention_mask)
            counting: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if measure and micro == 0:
                # A micro-batch read from a cache in memory is a view of the cache's tensor:
                # it counts as the micro-batch it holds (the cache is cache memory).
                caches = [c.storage for c in (self.cache, self.val_cache) if c is not None]
                saved = SavedActivations(self.rack.parameters(), shared=caches)
                counting = saved
            with self.dist.no_sync(model, last=micro == accum - 1):
                with counting, self._autocast():
                    logits = model(batch.inputs, hidden, batch.attention_mask)
                    loss = self.objective.loss(logits, batch)
                if self.dist.active:  # the global batch's loss gradient and token count
                    loss, tokens = self.dist.global_loss(loss, self.objective, batch, tokens)
                self.scaler.scale(loss / accum).backward()
            step_loss += loss.detach()
            per_token = train_flops_per_token(self.rack, plan, batch.inputs.shape[1])
            self.meter.count(tokens, per_token * tokens)
        value = float(self.dist.mean(step_loss)) / accum
        if not math.isfinite(value):
            clip = self.cfg.optimizer.grad_clip
            advice = (
                "lower training.optimizer.lr (or its warmup: training.schedule.warmup_fraction)"
                + (" or set training.optimizer.grad_clip" if clip is None else "")
                + (", or train in fp32" if self.autocast_dtype is not None else "")
            )
            raise TrainingError(
                f"non-finite loss ({value}) in stage {plan.name} "
                f"({plan.index + 1}/{len(self.plans)}) at step {self.global_step + 1} "
                f"(step {self.step_in_stage + 1} of the stage); {advice}"
            )
        self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.cfg.optimizer.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optimizer.grad_clip))
        self.scaler.step(self.optimizer)
        if saved is not None:  # weights, gradients and optimizer state all exist now
            self.stage_memory = measure_training_memory(
                self.rack, params, self.optimizer, saved.bytes, self.device
            )
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value, grad_norm

    def _after_step(
        self, plan: StagePlan, forward: StageForward, loss: float, grad_norm: float | None
    ) -> None:
        """Per-step hooks: metrics every log_every_steps, evaluation and checkpoints on cadence
        (the stage's last step is reported, evaluated and checkpointed by its stage end)."""
        self.step_in_stage += 1
        self.global_step += 1
        self.step_snapshot = None
        if self.redraws:
            redraw_kernel_features(self.rack, self.global_step)  # FAVOR+ projections due now
        self.loss_window.append(loss)
        last = self.step_in_stage == plan.steps
        if self.global_step % self.cfg.log_every_steps == 0 or last:
            assert self.scheduler is not None
            self.last_logged_loss = sum(self.loss_window) / len(self.loss_window)
            self.loss_window = []
            metrics = {
                "train/loss": self.last_logged_loss,
                "train/lr": float(self.scheduler.get_last_lr()[0]),
                "train/tokens_per_s": self.meter.interval_tokens_per_s(),
                "train/stage": float(plan.index),
                **self._progress(),
            }
            if grad_norm is not None:
                metrics["train/grad_norm"] = grad_norm
            self._emit("on_metrics", metrics, self.global_step)
        if last:
            return
        every_eval = self.cfg.eval.every_steps
        if every_eval and self.global_step % every_eval == 0:
            val = self._evaluate(plan, forward)
            if val:
                if self.global_step % self.cfg.log_every_steps:
                    val.update(self._progress())  # not a logging step: give val/loss its x
                self._emit("on_metrics", {**val, "val/stage": float(plan.index)}, self.global_step)
        if self._checkpoint_due():
            self._save_checkpoint()

    def _progress(self) -> dict[str, float]:
        """Run totals so far: training tokens seen and executed FLOPs (x axes of comparisons)."""
        return {
            "train/tokens": float(self.total_tokens + self.meter.tokens),
            "train/flops": self.total_flops + self.meter.flops,
        }

    def _run_stage(self, plan: StagePlan) -> None:
        self.memory.reset()
        self.meter.start()
        self._bring_in(plan)
        # Looked up once per stage, not on every step: does any FAVOR+ module redraw?
        self.redraws = any(
            isinstance(m, KernelAttention) and m.redraw_every for m in self.rack.modules()
        )
        self._init_piece(plan)
        params = self._trainable(plan)
        with self.meter.training():
            self._prepare_data(plan)
        forward = StageForward(self.rack, plan.start, plan.end)
        # Under torchrun the trainable forward is data-parallel; the frozen trunk is not wrapped.
        trained = self.dist.wrap(forward) if self.dist.active else forward
        model: nn.Module = torch.compile(trained) if self.cfg.compile else trained  # type: ignore[assignment]
        self._start_optimizer(plan, params)
        self._emit("on_stage_start", plan.info(), self.global_step)
        while self.step_in_stage < plan.steps:
            self.step_snapshot = self._snapshot()
            with self.meter.training():
                loss, grad_norm = self._train_step(plan, model, params)
            self._after_step(plan, forward, loss, grad_norm)
        val = self._evaluate(plan, forward)
        if val:  # at the stage's last step, whose train metrics carry the progress totals
            self._emit("on_metrics", {**val, "val/stage": float(plan.index)}, self.global_step)
        self._end_stage(plan, val)

    def _end_stage(self, plan: StagePlan, val: dict[str, float]) -> None:
        """Report the stage's result, add its counts to the run's, and checkpoint."""
        meter = self.meter
        peak = max(meter.peak_bytes, self.memory.peak())
        extra: dict[str, float] = {"lr": plan.lr, "train_time_s": meter.train_seconds}
        if self.cache is not None:
            extra["cache_bytes"] = float(self.cache.size_bytes)
            extra["cache_on_disk"] = float(self.cache.location == "disk")
        if self.stage_memory is not None:
            caches = [c for c in (self.cache, self.val_cache) if c is not None]
            report = MemoryReport(
                self.stage_memory,
                sum(c.memory_bytes for c in caches),
                sum(c.disk_bytes for c in caches),
                peak,
            )
            extra.update(report.metrics())
        result = StageResult(
            stage=plan.info(),
            steps=self.step_in_stage,
            tokens=meter.tokens,
            train_loss=self.last_logged_loss,
            val_loss=val.get("val/loss"),
            val_perplexity=val.get("val/perplexity"),
            wall_time_s=meter.wall_seconds(),
            tokens_per_s=meter.tokens_per_s(),
            peak_memory_bytes=peak,
            flops=meter.flops,
            mfu=meter.mfu(self.peak_flops),
            extra=extra,
        )
        self.stage_results.append(result)
        self.total_tokens += meter.tokens
        self.total_flops += meter.flops
        self.stage_index += 1
        self.step_in_stage = 0
        self.meter = StageMeter()
        self.stage_memory = None
        self.optimizer = self.scheduler = None
        # Report first: a run resumed from the stage-end checkpoint starts after this stage and
        # never reports it again, so it must reach the callbacks before the checkpoint exists.
        self._emit("on_stage_end", result, self.global_step)
        if self.trainer.checkpoint_dir is not None:
            self._save_checkpoint()

    def _finish(self) -> TrainingResults:
        weights_dir = None
        if self.pieces is not None and any(block_is_meta(b) for b in self.blocks):
            # Out of core the rack is never whole: the final evaluation runs the readout on the
            # validation cache extended through the last piece, and the trained rack is
            # written piece by piece.
            final = self._evaluate_from_cache()
            next_token = (
                math.exp(min(final["val/loss"], 50.0))
                if final and self.cfg.objective == "clm"
                else None
            )
            for cache in (self.cache, self.val_cache):
                if cache is not None:
                    cache.close()
            self.cache = self.val_cache = None
            weights_dir = str(self.pieces.write_rack(self.pieces.folder / "rack"))
            test = self._evaluate_test(whole_rack=False)
        else:
            for cache in (self.cache, self.val_cache):
                if cache is not None:
                    cache.close()
            self.cache = self.val_cache = None
            self._restore_frozen()
            final = self._evaluate(None, None)
            next_token = self._next_token_perplexity()
            test = self._evaluate_test(whole_rack=True)
        if test:
            self._emit("on_metrics", test, self.global_step)
        if final:
            metrics = dict(final)
            if next_token is not None:
                metrics["val/next_token_perplexity"] = next_token
            self._emit(
                "on_metrics",
                {f"final/{k.split('/')[1]}": v for k, v in metrics.items()},
                self.global_step,
            )
        wall = self.previous_wall + time.perf_counter() - self.run_start
        train_seconds = sum(r.extra.get("train_time_s", r.wall_time_s) for r in self.stage_results)
        peak = max([r.peak_memory_bytes for r in self.stage_results] + [self.memory.peak()])
        return TrainingResults(
            training_architecture=self.cfg.training_architecture,
            objective=self.cfg.objective,
            stages=list(self.stage_results),
            final_train_loss=self.stage_results[-1].train_loss,
            final_val_loss=final.get("val/loss"),
            final_val_perplexity=final.get("val/perplexity"),
            next_token_perplexity=next_token,
            final_test_loss=test.get("test/loss"),
            total_steps=self.global_step,
            total_tokens=self.total_tokens,
            wall_time_s=wall,
            tokens_per_s=self.total_tokens / max(train_seconds, 1e-9),
            peak_memory_bytes=peak,
            flops=self.total_flops,
            mfu=(
                None
                if self.peak_flops is None
                else self.total_flops / max(train_seconds, 1e-9) / self.peak_flops
            ),
            device=str(self.device),
            extra={
                **_largest_memory(self.stage_results),
                "stages": float(len(self.plans)),
                "tokens_seen": float(self.total_tokens),
                "unique_tokens": float(self.unique_tokens),
                "train_time_s": train_seconds,
            },
            weights_dir=weights_dir,
        )

    # -- checkpoints -------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        """What a checkpoint taken in the middle of the coming step must record."""
        return {
            "stream": self.stream.position,
            "rng": self._rng_state(),
            "meter": self.meter.state(),
            "unique_tokens": self.unique_tokens,
        }

    def _rng_state(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "stream": self.stream_generator.get_state(),
        }

    def _weights(self) -> dict[str, torch.Tensor]:
        """The rack's weights with frozen pieces at full precision (out of core: what is in
        memory; blocks that are away are in their piece files)."""
        state = {k: v for k, v in self.rack.state_dict().items() if not v.is_meta}
        prefixes = {}
        for name, module in self.rack.named_modules():
            for index, block in enumerate(self.blocks):
                if module is block:
                    prefixes[index] = name
        for index, block_state in self.lowered.items():
            for key, value in block_state.items():
                state[f"{prefixes[index]}.{key}"] = value
        return state

    def _checkpoint_due(self) -> bool:
        """Whether a mid-stage checkpoint is due after this step: every `checkpoint.every_steps`
        global steps, or once `checkpoint.every_minutes` of training have passed since the last
        checkpoint (or the start), so a hard kill (SIGKILL, a lost node) loses at most that."""
        if self.trainer.checkpoint_dir is None:
            return False
        every_steps = self.cfg.checkpoint.every_steps
        if every_steps and self.global_step % every_steps == 0:
            return True
        minutes = self.cfg.checkpoint.every_minutes
        since = time.perf_counter() - max(self.run_start, self.last_checkpoint_at)
        return minutes is not None and since >= minutes * 60.0

    def _save_checkpoint(self, interrupted: bool = False) -> None:
        assert self.trainer.checkpoint_dir is not None
        self.last_checkpoint_at = time.perf_counter()
        if not self.dist.is_main:  # under torchrun rank 0 writes; every rank resumes from it
            return
        snapshot = self.step_snapshot if interrupted else None
        stream = snapshot["stream"] if snapshot else self.stream.position
        state = {
            "config_hash": self.config.config_hash(),
            "plan": [[p.name, p.steps] for p in self.plans],
            "stage_index": self.stage_index,
            "step_in_stage": self.step_in_stage,
            "global_step": self.global_step,
            "stream": list(stream),
            "pool_start": None if self.pool_start is None else list(self.pool_start),
            "total_tokens": self.total_tokens,
            "total_flops": self.total_flops,
            "unique_tokens": snapshot["unique_tokens"] if snapshot else self.unique_tokens,
            "wall_time_s": self.previous_wall + time.perf_counter() - self.run_start,
            "meter": {
                **(snapshot["meter"] if snapshot else self.meter.state()),
                "wall_before": self.meter.wall_seconds(),
                "peak_bytes": max(self.meter.peak_bytes, self.memory.peak()),
            },
            "last_logged_loss": self.last_logged_loss,
            "loss_window": list(self.loss_window),
            "stage_results": [asdict(r) for r in self.stage_results],
            "interrupted": interrupted,
            # fp16 loss scale (plain numbers; empty when no scaler is in use): a resume that
            # restarted from the initial scale would skip different steps on overflow.
            "grad_scaler": self.scaler.state_dict(),
        }
        in_stage = self.optimizer is not None and self.step_in_stage > 0
        # Callbacks make their records durable first: a resume from this checkpoint will not
        # repeat the steps before it, so nothing reported so far may be lost after it exists.
        self._emit("on_before_checkpoint", self.global_step)
        path = save_checkpoint(
            self.trainer.checkpoint_dir,
            name=f"{self.global_step:08d}-{self.stage_index:03d}-{self.step_in_stage:06d}",
            weights=self._weights(),
            optimizer=self.optimizer.state_dict() if in_stage and self.optimizer else None,
            scheduler=self.scheduler.state_dict() if in_stage and self.scheduler else None,
            rng=snapshot["rng"] if snapshot else self._rng_state(),
            state=state,
            metadata=self.trainer.checkpoint_metadata,
            keep_last=self.cfg.checkpoint.keep_last,
        )
        self._emit("on_checkpoint", path, self.global_step)

    def _restore_out_of_core(self, weights: dict[str, torch.Tensor]) -> None:
        """Blocks the checkpoint holds come into memory and take its weights; the others stay
        away (in their piece files, or not drawn yet)."""
        assert self.pieces is not None
        names = {id(m): n for n, m in self.rack.named_modules()}
        prefixes = [names[id(b)] + "." for b in self.blocks]
        for index, prefix in enumerate(prefixes):
            if any(key.startswith(prefix) for key in weights):
                self.pieces.bring_in(index)
        missing, unexpected = self.rack.load_state_dict(weights, strict=False)
        away = [k for k in missing if not any(k.startswith(p) for p in self._away_prefixes())]
        if unexpected or away:
            raise TrainingError(
                f"the checkpoint in {self.trainer.checkpoint_dir} does not match the rack "
                f"(unexpected {unexpected[:3]}, missing {away[:3]})"
            )

    def _away_prefixes(self) -> list[str]:
        names = {id(m): n for n, m in self.rack.named_modules()}
        return [names[id(b)] + "." for b in self.blocks if block_is_meta(b)]

    def _restore(self) -> None:
        assert self.trainer.checkpoint_dir is not None
        checkpoint = load_checkpoint(self.trainer.checkpoint_dir)
        if checkpoint is None:
            return
        state = checkpoint.state
        if state["config_hash"] != self.config.config_hash():
            raise TrainingError(
                f"the checkpoint in {checkpoint.path} belongs to another config "
                f"(hash {state['config_hash']}, this run {self.config.config_hash()}); use a "
                f"fresh checkpoint directory or resume=False"
            )
        if state["plan"] != [[p.name, p.steps] for p in self.plans]:
            raise TrainingError(
                f"the checkpoint in {checkpoint.path} was written for a different stage plan "
                f"(another rack?); use a fresh checkpoint directory or resume=False"
            )
        if self.pieces is None:
            self.rack.load_state_dict(checkpoint.weights)
            self.rack.to(self.device)
        else:
            self._restore_out_of_core(checkpoint.weights)
        self.stage_index = int(state["stage_index"])
        self.step_in_stage = int(state["step_in_stage"])
        self.global_step = int(state["global_step"])
        self.stream = BatchStream(self.dataloader, *state["stream"])
        pool_start = state["pool_start"]
        self.pool_start = None if pool_start is None else (int(pool_start[0]), int(pool_start[1]))
        self.total_tokens = int(state["total_tokens"])
        self.total_flops = float(state["total_flops"])
        self.unique_tokens = int(state["unique_tokens"])
        self.previous_wall = float(state["wall_time_s"])
        self.meter = StageMeter.from_state(state["meter"])
        self.last_logged_loss = float(state["last_logged_loss"])
        self.loss_window = [float(v) for v in state["loss_window"]]
        self.stage_results = []
        for item in state["stage_results"]:
            info = dict(item["stage"])
            info["trainable_blocks"] = tuple(info["trainable_blocks"])
            self.stage_results.append(StageResult(**{**item, "stage": StageInfo(**info)}))
        rng = checkpoint.rng
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.stream_generator.set_state(rng["stream"])
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.step_in_stage > 0:
            self.pending_optimizer = checkpoint.optimizer
            self.pending_scheduler = checkpoint.scheduler
