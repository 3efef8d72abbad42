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
   (`stackwise.training.stage_setup`.)
2. Depth-wise stages with ``depthwise.data: pool`` visit a fixed *sample pool*: the first
   ``max(stage steps) x grad_accum`` micro-batches of the data stream, corrupted once
   (mlm/diffusion masks drawn from a seeded generator when the pool is drawn). Every stage trains
   on this pool in the same order (a shorter stage uses its beginning); that is what lets the
   frozen trunk's output be computed once per sample (`stackwise.training.cache`) and extended
   one piece at a time (`stackwise.training.pool`). With ``data: fresh`` every stage reads new
   batches and the frozen trunk runs on each. The trunk runs under ``no_grad`` (or comes from
   the cache), so backward stops at the piece (`stackwise.training.trunk`). Cached and uncached
   training compute the same losses.
3. The rackwise, progressive and fusion stages read the data stream directly (corruption drawn
   per batch from a seeded generator; `stackwise.training.stream`) and train every parameter in
   their range not declared frozen.
4. A training step (`_train_step`): forward and backward over the micro-batches, AdamW with a
   warmup/decay schedule per stage, clipping, bf16/fp16 autocast and TF32 on CUDA, optional
   ``torch.compile``. A `StageMeter` counts the stage's tokens, executed FLOPs (by the rule of
   `stackwise.training.flops`: trainable piece 3x forward, trunk forward where it runs, cache
   building) and training seconds (steps and cache building only, so tokens/s and MFU exclude
   evaluation and checkpoints); the stage's training memory is measured on its first step.
5. Per-step hooks (`_after_step`): FAVOR+ projections redrawn when due
   (``kernel.redraw_every``), metrics every ``log_every_steps`` (with the run's tokens and FLOPs
   so far), validation every ``eval.every_steps`` (`stackwise.training.evaluation`), checkpoints
   every ``checkpoint.every_steps`` or ``checkpoint.every_minutes``; at the stage end,
   validation, the `StageResult` and a checkpoint.

Faults: a non-finite loss raises `TrainingError` naming the stage and step; CUDA out-of-memory
raises `TrainingError` naming the stage and what to change; Ctrl-C (KeyboardInterrupt) writes a
checkpoint (when a checkpoint directory is set) and re-raises. A checkpoint's state is the run's
position (`stackwise.training.position.RunPosition`); resuming restores it, the weights,
optimizer, scheduler, fp16 loss scale and RNG states; the pool and the cache are rebuilt
deterministically.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stackwise.config.base import StackWiseConfig
from stackwise.model.attention import KernelAttention, redraw_kernel_features
from stackwise.model.materialize import block_is_meta
from stackwise.training.cache import storage_dtype
from stackwise.training.callbacks import StageResult, TrainingCallback, TrainingResults
from stackwise.training.checkpoint import RunCheckpoints
from stackwise.training.device import resolve_device, training_switches
from stackwise.training.distributed import Distributed
from stackwise.training.errors import TrainingError
from stackwise.training.evaluation import Evaluator
from stackwise.training.flops import forward_flops_per_token, runs_trunk, train_flops_per_token
from stackwise.training.meter import StageMeter
from stackwise.training.metrics import (
    MemoryReport,
    PeakMemory,
    StageMemoryProbe,
    device_peak_flops,
)
from stackwise.training.objectives import Corruption, Objective, training_objective
from stackwise.training.optim import build_optimizer, build_scheduler
from stackwise.training.pieces import PieceStore, return_freed_memory
from stackwise.training.pool import SamplePool
from stackwise.training.position import RunPosition
from stackwise.training.stage_setup import StageForward, StageSetup
from stackwise.training.stages import StagePlan, plan_stages, prepare_rack
from stackwise.training.stream import BatchStream, token_count, unpack_batch
from stackwise.training.trunk import FrozenTrunk

__all__ = ["ArchitectureTrainer", "TrainingError"]

_unpack = unpack_batch  # the name this module has always had for it

_OOM_ERRORS: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
)


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
        return _Run(self, rack, dataloader, eval_dataloader, test_dataloader).execute()


class _Run:
    """One `train_architecture` call: the loop over stages and steps, its checkpoints and
    results; the parts it drives do the rest (see the module docstring)."""

    def __init__(
        self,
        trainer: ArchitectureTrainer,
        rack: nn.Module,
        dataloader: Iterable[Any],
        eval_dataloader: Iterable[Any] | None,
        test_dataloader: Iterable[Any] | None,
    ) -> None:
        self.trainer = trainer
        self.config = trainer.config
        self.cfg = cfg = trainer.config.training
        self.rack = rack
        # Under torchrun (`stackwise.training.distributed`) this process's rank in the run; a
        # world of one (no process group) changes nothing below.
        self.dist = Distributed.current()
        self.device = self.dist.device(resolve_device(cfg.device))
        if self.dist.active:
            problem = self.dist.check_batch_size(cfg.batch_size)
            if problem is None and cfg.out_of_core:
                problem = "training.out_of_core trains in one process; run it without torchrun"
            if problem is not None:
                raise TrainingError(problem)
            read_rows_of = getattr(dataloader, "read_rows_of", None)
            if read_rows_of is not None:  # a memory-mapped corpus: read this rank's rows only
                read_rows_of(self.dist.rank, self.dist.world)
        self.dataloader = dataloader
        self.objective = self._objective(rack)
        pieces = None
        if cfg.out_of_core:
            # Draws the embedding and readout of a rack built on the meta device (before the
            # head is untied: the draws follow the rack as it was built).
            pieces = PieceStore(
                rack,  # type: ignore[arg-type]
                self._pieces_folder(),
                self.device,
                lambda index, block: self.setup.block_replaced(index, block),
            )
        prepare_rack(self.config, rack)  # a depth-wise run's head gets its own weight
        self.plans = plan_stages(self.config, rack)
        self.setup = StageSetup(rack, self.plans, cfg)
        autocast = None
        if self.device.type == "cuda" and cfg.precision != "fp32":
            autocast = storage_dtype(cfg.precision)
        self.trunk = FrozenTrunk(
            rack,
            self.device,
            precision=cfg.frozen_precision,
            offload=cfg.offload_frozen,
            autocast_dtype=autocast,
            pieces=pieces,
        )
        self.pooled = cfg.depthwise.data == "pool"  # depth-wise stages share one pool
        self.pool = SamplePool(
            self.config,
            self.plans,
            dataloader,
            self.objective,
            self.trunk,
            self.dist,
            directory=trainer.checkpoint_dir,
            out_of_core=pieces is not None,
        )
        self.evaluator = Evaluator(
            rack, self.objective, self.trunk, cfg.eval, cfg.seed, eval_dataloader, test_dataloader
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.device.type == "cuda" and cfg.precision == "fp16"
        )
        self.memory = PeakMemory(self.device)
        self.peak_flops = device_peak_flops(self.device, cfg.precision)

        self.position = RunPosition(
            config_hash=self.config.config_hash(), plan=[(p.name, p.steps) for p in self.plans]
        )
        self.stream = BatchStream(dataloader)
        self.stream_generator = torch.Generator().manual_seed(cfg.seed + 3)
        self.meter = StageMeter()
        self.probe = StageMemoryProbe(rack, self.device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.pending_optimizer: dict[str, Any] | None = None
        self.pending_scheduler: dict[str, Any] | None = None
        # The position and RNG states at the start of the running step (None between steps).
        self.step_start: tuple[RunPosition, dict[str, Any]] | None = None
        self.redraws = False
        self.run_start = 0.0
        self.checkpoints: RunCheckpoints | None = None
        if trainer.checkpoint_dir is not None:
            self.checkpoints = RunCheckpoints(
                trainer.checkpoint_dir, cfg.checkpoint, trainer.checkpoint_metadata
            )

    def _objective(self, rack: nn.Module) -> Objective:
        vocab = int(rack.vocab_size)  # type: ignore[arg-type]
        if self.cfg.objective == "clm" and not bool(rack.is_causal):
            warnings.warn(
                "training.objective is clm but the rack has bidirectional blocks: they can see "
                "the token they predict; use causal attention or objective mlm/diffusion",
                stacklevel=4,
            )
        return training_objective(self.cfg, vocab, self.trainer.mask_token_id)

    def _pieces_folder(self) -> Path:
        """``<checkpoints>/pieces``; without checkpoints a temporary folder, whose piece files
        are removed once the trained rack is written there (`results.weights_dir`)."""
        if self.trainer.checkpoint_dir is not None:
            return self.trainer.checkpoint_dir / "pieces"
        return Path(tempfile.mkdtemp(prefix="stackwise-pieces-"))

    def _emit(self, hook: str, *args: Any) -> None:
        if not self.dist.is_main:  # under torchrun rank 0 alone reports
            return
        for callback in self.trainer.callbacks:
            method = getattr(callback, hook, None)  # callbacks may implement only some hooks
            if method is not None:
                method(*args)

    # -- the run -----------------------------------------------------------------------------

    def execute(self) -> TrainingResults:
        with training_switches(self.device, self.cfg.deterministic):
            return self._execute()

    def _execute(self) -> TrainingResults:
        torch.manual_seed(self.cfg.seed)
        if self.trunk.pieces is None:
            self.rack.to(self.device)
        else:  # blocks move to the device as they come into memory
            for name in ("token_embedding", "norm", "lm_head"):
                self.rack.get_submodule(name).to(self.device)
        if self.checkpoints is not None and self.trainer.resume:
            self._restore(self.checkpoints)
        self.evaluator.build()
        self._emit("on_train_start", [p.info() for p in self.plans])
        self.run_start = time.perf_counter()
        if self.checkpoints is not None:
            self.checkpoints.start()
        plan: StagePlan | None = None
        try:
            for plan in self.plans[self.position.stage_index :]:
                self._run_stage(plan)
            plan = None
            results = self._finish()
        except KeyboardInterrupt:
            if self.checkpoints is not None:
                self._save_checkpoint(self.checkpoints, interrupted=True)
            raise
        except _OOM_ERRORS as error:
            where = (
                f"stage {plan.name} ({plan.index + 1}/{len(self.plans)})" if plan else "evaluation"
            )
            raise TrainingError(
                f"out of memory on {self.device} in {where} at step "
                f"{self.position.global_step + 1}: lower training.batch_size (raise "
                f"training.grad_accum_steps to keep the effective batch), set "
                f"training.precision: bf16, training.frozen_precision: bf16, "
                f"training.cache.location: cpu or disk, or train depth-wise "
                f"(training_architecture: blockwise)"
            ) from error
        finally:
            self._release()
        self._emit("on_train_end", results)
        return results

    def _release(self) -> None:
        """Drop caches, put every piece back on the device in fp32, restore flags and modes."""
        self.pool.close()
        self.trunk.restore()
        self.setup.release()

    # -- a stage -----------------------------------------------------------------------------

    def _run_stage(self, plan: StagePlan) -> None:
        self.memory.reset()
        self.meter.start()
        self.trunk.bring_in(plan.start, plan.end)
        # Looked up once per stage, not on every step: does any FAVOR+ module redraw?
        self.redraws = any(
            isinstance(m, KernelAttention) and m.redraw_every for m in self.rack.modules()
        )
        if self.position.step_in_stage == 0:  # never again on a resumed stage
            self.setup.initialise(plan, self.trunk.state_of)
        params = self.setup.trainable(plan)
        with self.meter.training():
            self._prepare_data(plan)
        forward = StageForward(self.rack, plan.start, plan.end)
        # Under torchrun the trainable forward is data-parallel; the frozen trunk is not wrapped.
        trained = self.dist.wrap(forward) if self.dist.active else forward
        model: nn.Module = torch.compile(trained) if self.cfg.compile else trained  # type: ignore[assignment]
        self._start_optimizer(plan, params)
        self.probe = StageMemoryProbe(
            self.rack, self.device, self.pool.storages, enabled=not self.cfg.compile
        )
        self._emit("on_stage_start", plan.info(), self.position.global_step)
        while self.position.step_in_stage < plan.steps:
            self.step_start = (self._capture(), self._rng_state())
            with self.meter.training():
                loss, grad_norm = self._train_step(plan, model, params)
            self._after_step(plan, forward, loss, grad_norm)
        val = self.evaluator.stage(plan, forward, self.pool.val_cache)
        if val:  # at the stage's last step, whose train metrics carry the progress totals
            self._emit("on_metrics", {**val, "val/stage": float(plan.index)}, self.global_step)
        self._end_stage(plan, val)

    @property
    def global_step(self) -> int:
        return self.position.global_step

    def _prepare_data(self, plan: StagePlan) -> None:
        """Freeze the trunk below the stage and, for a pooled depth-wise stage, bring the sample
        pool and its activation cache up to the stage's first block."""
        if plan.depthwise:
            self.trunk.freeze_below(plan.start)
            if self.pooled:
                self._ensure_pool()
                self.pool.prepare(plan, self.evaluator.entries, self.meter.add_flops)
                if self.pool.caching(plan):
                    self.trunk.offload_below(plan.start)
                if self.pool.cache is not None:
                    self.trunk.put_away(self.pool.prefix_end)
            return
        self.pool.close()
        self.trunk.restore()

    def _ensure_pool(self) -> None:
        """Draw the sample pool where the data stream stands (a resumed run: where it was
        drawn), and continue the stream after it."""
        if self.pool.batches is not None:
            return
        position = self.position
        start = position.pool_start
        fresh = start is None
        if start is None:
            start = self.stream.position
        stream, unique = self.pool.draw(start)
        if fresh:
            self.stream = stream
            position.unique_tokens += unique
        position.pool_start = start

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

    def _micro_batch(self, plan: StagePlan, index: int) -> tuple[Corruption, torch.Tensor | None]:
        """The corrupted micro-batch number `index` of the stage and its trunk output (if any):
        from the pool and its cache, or from the data stream; the trunk runs (and its FLOPs
        are counted) where the cache does not hold its output."""
        if plan.depthwise and self.pooled:
            batch, hidden = self.pool.read(plan, index)
        else:
            ids, mask, new_tokens = self.stream.take()
            self.position.unique_tokens += new_tokens
            batch = self.objective.corrupt(ids, self.stream_generator, mask)
            batch = self.dist.shard(batch).to(self.device)  # this rank's rows (torchrun)
            hidden = None
        if hidden is None and runs_trunk(plan):
            trunk = forward_flops_per_token(self.rack, 0, plan.start, batch.inputs.shape[1])
            self.meter.add_flops(trunk * batch.inputs.numel() * self.dist.world)
            hidden = self.trunk.output(batch, plan.start)
        return batch, hidden

    def _train_step(
        self, plan: StagePlan, model: nn.Module, params: list[nn.Parameter]
    ) -> tuple[float, float | None]:
        """One optimizer step: forward, loss and backward over the micro-batches, clip, step.
        Returns the mean loss and the gradient norm before clipping (None without clipping)."""
        assert self.optimizer is not None and self.scheduler is not None
        accum = self.cfg.grad_accum_steps
        step_loss = torch.zeros((), device=self.device)
        for micro in range(accum):
            batch, hidden = self._micro_batch(plan, self.position.step_in_stage * accum + micro)
            tokens = token_count(batch.inputs, batch.attention_mask)
            with self.dist.no_sync(model, last=micro == accum - 1):
                with self.probe.saving(micro), self.trunk.autocast():
                    logits = model(batch.inputs, hidden, batch.attention_mask)
                    loss = self.objective.loss(logits, batch)
                if self.dist.active:  # the global batch's loss gradient and token count
                    loss, tokens = self.dist.global_loss(loss, self.objective, batch, tokens)
                self.scaler.scale(loss / accum).backward()
            step_loss += loss.detach()
            per_token = train_flops_per_token(self.rack, plan, batch.inputs.shape[1])
            self.meter.count(tokens, per_token * tokens)
        value = self._finite(float(self.dist.mean(step_loss)) / accum, plan)
        self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.cfg.optimizer.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optimizer.grad_clip))
        self.scaler.step(self.optimizer)
        self.probe.measure(params, self.optimizer)  # weights, gradients and state exist now
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value, grad_norm

    def _finite(self, loss: float, plan: StagePlan) -> float:
        """`loss`, or a `TrainingError` naming the stage, the step and what to change."""
        if math.isfinite(loss):
            return loss
        clip = self.cfg.optimizer.grad_clip
        advice = (
            "lower training.optimizer.lr (or its warmup: training.schedule.warmup_fraction)"
            + (" or set training.optimizer.grad_clip" if clip is None else "")
            + (", or train in fp32" if self.trunk.autocast_dtype is not None else "")
        )
        position = self.position
        raise TrainingError(
            f"non-finite loss ({loss}) in stage {plan.name} "
            f"({plan.index + 1}/{len(self.plans)}) at step {position.global_step + 1} "
            f"(step {position.step_in_stage + 1} of the stage); {advice}"
        )

    def _after_step(
        self, plan: StagePlan, forward: StageForward, loss: float, grad_norm: float | None
    ) -> None:
        """Per-step hooks: metrics every log_every_steps, evaluation and checkpoints on cadence
        (the stage's last step is reported, evaluated and checkpointed by its stage end)."""
        position = self.position
        position.step_in_stage += 1
        position.global_step += 1
        self.step_start = None
        if self.redraws:
            redraw_kernel_features(self.rack, position.global_step)  # FAVOR+ projections due now
        position.loss_window.append(loss)
        last = position.step_in_stage == plan.steps
        logged = position.global_step % self.cfg.log_every_steps == 0
        if logged or last:
            self._log(plan, grad_norm)
        if last:
            return
        if self.evaluator.should_evaluate(position.global_step):
            val = self.evaluator.stage(plan, forward, self.pool.val_cache)
            if val:
                if not logged:
                    val.update(self._progress())  # not a logging step: give val/loss its x
                self._emit("on_metrics", {**val, "val/stage": float(plan.index)}, self.global_step)
        if self.checkpoints is not None and self.checkpoints.due(position.global_step):
            self._save_checkpoint(self.checkpoints)

    def _log(self, plan: StagePlan, grad_norm: float | None) -> None:
        """Report the training metrics: the mean loss since the last report, lr, rate, totals."""
        assert self.scheduler is not None
        position = self.position
        position.last_logged_loss = sum(position.loss_window) / len(position.loss_window)
        position.loss_window = []
        metrics = {
            "train/loss": position.last_logged_loss,
            "train/lr": float(self.scheduler.get_last_lr()[0]),
            "train/tokens_per_s": self.meter.interval_tokens_per_s(),
            "train/stage": float(plan.index),
            **self._progress(),
        }
        if grad_norm is not None:
            metrics["train/grad_norm"] = grad_norm
        self._emit("on_metrics", metrics, self.global_step)

    def _progress(self) -> dict[str, float]:
        """Run totals so far: training tokens seen and executed FLOPs (x axes of comparisons)."""
        return {
            "train/tokens": float(self.position.total_tokens + self.meter.tokens),
            "train/flops": self.position.total_flops + self.meter.flops,
        }

    def _end_stage(self, plan: StagePlan, val: dict[str, float]) -> None:
        """Report the stage's result, add its counts to the run's, and checkpoint."""
        meter, position = self.meter, self.position
        peak = max(meter.peak_bytes, self.memory.peak())
        extra: dict[str, float] = {"lr": plan.lr, "train_time_s": meter.train_seconds}
        extra.update(self.pool.metrics())
        if self.probe.memory is not None:
            in_memory, on_disk = self.pool.memory_bytes()
            extra.update(MemoryReport(self.probe.memory, in_memory, on_disk, peak).metrics())
        result = StageResult(
            stage=plan.info(),
            steps=position.step_in_stage,
            tokens=meter.tokens,
            train_loss=position.last_logged_loss,
            val_loss=val.get("val/loss"),
            val_perplexity=val.get("val/perplexity"),
            wall_time_s=meter.wall_seconds(),
            tokens_per_s=meter.tokens_per_s(),
            peak_memory_bytes=peak,
            flops=meter.flops,
            mfu=meter.mfu(self.peak_flops),
            extra=extra,
        )
        position.stage_results.append(result)
        position.total_tokens += meter.tokens
        position.total_flops += meter.flops
        position.stage_index += 1
        position.step_in_stage = 0
        self.meter = StageMeter()
        self.optimizer = self.scheduler = None
        if self.trunk.pieces is not None:
            # The stage's optimizer state, gradients and activations are freed: out of core,
            # hand their pages back, so a deep run's heap does not grow stage by stage.
            return_freed_memory()
        # Report first: a run resumed from the stage-end checkpoint starts after this stage and
        # never reports it again, so it must reach the callbacks before the checkpoint exists.
        self._emit("on_stage_end", result, self.global_step)
        if self.checkpoints is not None:
            self._save_checkpoint(self.checkpoints)

    # -- the end -----------------------------------------------------------------------------

    def _finish(self) -> TrainingResults:
        weights_dir = None
        pieces = self.trunk.pieces
        if pieces is not None and any(block_is_meta(b) for b in self.trunk.blocks):
            # Out of core the rack is never whole: the final evaluation runs the readout on the
            # validation cache extended through the last piece, and the trained rack is
            # written piece by piece.
            final = self.evaluator.from_cache(self.pool.val_cache)
            next_token = (
                math.exp(min(final["val/loss"], 50.0))
                if final and self.cfg.objective == "clm"
                else None
            )
            self.pool.close()
            weights_dir = str(pieces.write_rack(pieces.folder / "rack"))
            test = self.evaluator.test(whole_rack=False)  # reads the pieces
            if self.checkpoints is None:  # nothing resumes from the pieces: the rack has them
                pieces.discard_pieces()
        else:
            self.pool.close()
            self.trunk.restore()
            final = self.evaluator.whole_rack()
            next_token = self.evaluator.next_token_perplexity()
            test = self.evaluator.test(whole_rack=True)
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
        return self._results(final, next_token, test, weights_dir)

    def _results(
        self,
        final: dict[str, float],
        next_token: float | None,
        test: dict[str, float],
        weights_dir: str | None,
    ) -> TrainingResults:
        stages = self.position.stage_results
        return self.position.results(
            training_architecture=self.cfg.training_architecture,
            objective=self.cfg.objective,
            planned_stages=len(self.plans),
            final=final,
            next_token_perplexity=next_token,
            test=test,
            wall_time_s=self.position.wall_time_s + time.perf_counter() - self.run_start,
            peak_memory_bytes=max([r.peak_memory_bytes for r in stages] + [self.memory.peak()]),
            peak_flops=self.peak_flops,
            device=str(self.device),
            weights_dir=weights_dir,
        )

    # -- checkpoints -------------------------------------------------------------------------

    def _capture(self) -> RunPosition:
        """The run's position now, its live parts (data stream, meter) included."""
        position = self.position
        return replace(
            position,
            stream=self.stream.position,
            meter=self.meter.state(),
            loss_window=list(position.loss_window),
            stage_results=list(position.stage_results),
        )

    def _rng_state(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "stream": self.stream_generator.get_state(),
        }

    def _save_checkpoint(self, checkpoints: RunCheckpoints, interrupted: bool = False) -> None:
        """Write a checkpoint of the run as it stands; `interrupted` (Ctrl-C): as it stood at
        the start of the running step, which the resumed run then repeats."""
        checkpoints.taken()
        if not self.dist.is_main:  # under torchrun rank 0 writes; every rank resumes from it
            return
        captured = self.step_start if interrupted else None
        position, rng = captured or (self._capture(), self._rng_state())
        state = replace(
            position,
            wall_time_s=self.position.wall_time_s + time.perf_counter() - self.run_start,
            meter={
                **position.meter,
                "wall_before": self.meter.wall_seconds(),
                "peak_bytes": max(self.meter.peak_bytes, self.memory.peak()),
            },
            interrupted=interrupted,
            grad_scaler=self.scaler.state_dict(),
        )
        in_stage = self.optimizer is not None and self.position.step_in_stage > 0
        # Callbacks make their records durable first: a resume from this checkpoint will not
        # repeat the steps before it, so nothing reported so far may be lost after it exists.
        self._emit("on_before_checkpoint", self.global_step)
        path = checkpoints.write(
            state,
            weights=self.trunk.weights(),
            optimizer=self.optimizer.state_dict() if in_stage and self.optimizer else None,
            scheduler=self.scheduler.state_dict() if in_stage and self.scheduler else None,
            rng=rng,
        )
        self._emit("on_checkpoint", path, self.global_step)

    def _restore(self, checkpoints: RunCheckpoints) -> None:
        """Continue from the newest checkpoint, when there is one."""
        read = checkpoints.read(self.position)
        if read is None:
            return
        position, checkpoint = read
        if self.trunk.pieces is None:
            self.rack.load_state_dict(checkpoint.weights)
            self.rack.to(self.device)
        else:
            self.trunk.load_out_of_core(checkpoint.weights, checkpoints.directory)
        self.position = position
        self.stream = BatchStream(self.dataloader, *position.stream)
        self.meter = StageMeter.from_state(position.meter)
        rng = checkpoint.rng
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.stream_generator.set_state(rng["stream"])
        if position.grad_scaler:
            self.scaler.load_state_dict(position.grad_scaler)
        if position.step_in_stage > 0:
            self.pending_optimizer = checkpoint.optimizer
            self.pending_scheduler = checkpoint.scheduler
