"""Evaluation during and after training: a stage, the whole rack, from the cache, the test data.

`Evaluator` corrupts the first ``eval.batches`` validation batches once (mlm/diffusion masks
from a seeded generator, so every evaluation sees the same batches) and reports the objective's
validation metrics (`Objective.eval_metrics`) of

- a stage as trained so far (`stage`): its forward on the frozen trunk's output, read from the
  validation cache when it holds it, else computed;
- the whole rack (`whole_rack`), and its next-token perplexity when it is causal;
- the whole rack from the validation cache extended through the last block (`from_cache`: out
  of core, where the rack is never whole);
- the held-out test data (`test`), every batch of it, with masks from a fixed seed.

Evaluation runs in eval mode (no dropout) and is never counted as training (FLOPs, time).
`should_evaluate` is the cadence: every ``eval.every_steps`` global steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from stackwise.config.base import EvalConfig
from stackwise.training.cache import ActivationCache
from stackwise.training.objectives import CausalLM, Corruption, Objective
from stackwise.training.stages import StagePlan
from stackwise.training.stream import first_pass, unpack_batch
from stackwise.training.trunk import FrozenTrunk

# Seed of the masks drawn for the test data (mlm, diffusion): fixed, so every run of a
# comparison is tested on the same corrupted batches whatever its training seed.
TEST_MASK_SEED = 7919


class Evaluator:
    """Validation and test metrics of one run (see the module docstring)."""

    def __init__(
        self,
        rack: nn.Module,
        objective: Objective,
        trunk: FrozenTrunk,
        settings: EvalConfig,
        seed: int,
        eval_loader: Iterable[Any] | None = None,
        test_loader: Iterable[Any] | None = None,
    ) -> None:
        self.rack = rack
        self.objective = objective
        self.trunk = trunk
        self.settings = settings
        self.seed = seed
        self.eval_loader = eval_loader
        self.test_loader = test_loader
        self.entries: list[Corruption] = []  # the corrupted validation batches
        self.raw: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # and as read

    def build(self) -> None:
        """Read and corrupt the validation batches (once, before training)."""
        if self.eval_loader is None:
            return
        generator = torch.Generator().manual_seed(self.seed + 2)
        for count, batch in enumerate(first_pass(self.eval_loader)):
            if count >= self.settings.batches:
                break
            ids, mask = unpack_batch(batch)
            self.raw.append((ids, mask))
            self.entries.extend(self.objective.eval_corruptions(ids, generator, mask))

    def should_evaluate(self, step: int) -> bool:
        """Whether global step `step` is on the ``eval.every_steps`` cadence."""
        every = self.settings.every_steps
        return every is not None and every > 0 and step % every == 0

    @torch.no_grad()
    def stage(
        self,
        plan: StagePlan | None,
        forward: nn.Module | None,
        val_cache: ActivationCache | None = None,
    ) -> dict[str, float]:
        """Validation metrics of the model as trained so far: a depth-wise `plan`'s `forward`
        (`stackwise.training.stage_setup.StageForward`), else the whole rack (None plan)."""
        if not self.entries:
            return {}
        device = self.trunk.device
        tree = self.rack.resident_tree()  # type: ignore[operator]
        modes = [m.training for m in tree]
        _eval(self.rack)
        losses = []
        for index, entry in enumerate(self.entries):
            batch = entry.to(device)
            with self.trunk.autocast():
                if plan is None or not plan.depthwise:
                    logits = self.rack(batch.inputs, batch.attention_mask)
                else:
                    assert forward is not None
                    hidden = None
                    if not plan.trains_embedding:
                        if val_cache is not None and val_cache.filled:
                            hidden = val_cache.read(index)
                        else:
                            hidden = self.trunk.output(batch, plan.start)
                    logits = forward(batch.inputs, hidden, batch.attention_mask)
            losses.append(float(self.objective.loss(logits, batch)))
        for module, mode in zip(tree, modes, strict=True):
            module.training = mode
        return self.objective.eval_metrics(losses)

    def whole_rack(self) -> dict[str, float]:
        """Validation metrics of the whole rack."""
        return self.stage(None, None)

    @torch.no_grad()
    def from_cache(self, val_cache: ActivationCache | None) -> dict[str, float]:
        """Validation metrics of the whole rack from the validation cache, extended through
        the last block first (out of core)."""
        if val_cache is None or not self.entries:
            return {}
        n_blocks = len(self.trunk.blocks)
        begin = val_cache.prefix_end
        _eval(self.rack)  # the last trained block is still in hand: no dropout while extending
        if begin < n_blocks:

            def apply(h: torch.Tensor, i: int) -> torch.Tensor:
                return self.trunk.extend(h, begin, n_blocks, self.entries[i].attention_mask)

            val_cache.extend(apply, n_blocks)
        _eval(self.rack)
        losses = []
        for index, entry in enumerate(self.entries):
            batch = entry.to(self.trunk.device)
            with self.trunk.autocast():
                logits = self.rack.readout(val_cache.read(index))  # type: ignore[operator]
            losses.append(float(self.objective.loss(logits, batch)))
        return self.objective.eval_metrics(losses)

    @torch.no_grad()
    def test(self, whole_rack: bool) -> dict[str, float]:
        """``test/*`` metrics of the trained rack over every batch of the test data (masks of
        mlm/diffusion drawn from a fixed seed, the same for every training seed). Out of core
        (`whole_rack` False) the trunk runs block by block from the saved pieces."""
        if self.test_loader is None:
            return {}
        _eval(self.rack)
        generator = torch.Generator().manual_seed(TEST_MASK_SEED)
        losses = []
        for batch in first_pass(self.test_loader):
            ids, mask = unpack_batch(batch)
            for entry in self.objective.eval_corruptions(ids, generator, mask):
                corrupted = entry.to(self.trunk.device)
                with self.trunk.autocast():
                    if whole_rack:
                        logits = self.rack(corrupted.inputs, corrupted.attention_mask)
                    else:
                        hidden = self.trunk.output(corrupted, len(self.trunk.blocks))
                        logits = self.rack.readout(hidden)  # type: ignore[operator]
                losses.append(float(self.objective.loss(logits, corrupted)))
        if not losses:
            return {}
        metrics = self.objective.eval_metrics(losses)
        return {f"test/{key.split('/', 1)[1]}": value for key, value in metrics.items()}

    @torch.no_grad()
    def next_token_perplexity(self) -> float | None:
        """exp of the next-token loss of the whole rack on the validation batches as read
        (causal racks only; the objective's corruption plays no part)."""
        if not self.raw or not bool(self.rack.is_causal):
            return None
        _eval(self.rack)
        clm = CausalLM()
        losses = []
        for ids, mask in self.raw:
            batch = clm.corrupt(ids, None, mask).to(self.trunk.device)
            with self.trunk.autocast():
                logits = self.rack(batch.inputs, batch.attention_mask)
            losses.append(float(clm.loss(logits, batch)))
        return math.exp(min(sum(losses) / len(losses), 50.0))


def _eval(rack: nn.Module) -> None:
    """``rack.eval()`` for the blocks in memory (out of core, the others are away)."""
    for module in rack.resident_tree():  # type: ignore[operator]
        module.training = False
