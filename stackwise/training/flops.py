"""The FLOPs rule: what training a stage executes, in one place for the trainer and the planner.

The trainer meters a run with these functions as it executes it (`stackwise.training.meter`);
the planner predicts a run with the same functions (`stackwise.training.stages` converts a
FLOPs budget into steps, `stackwise.training.memory.estimate_run` predicts the FLOPs of every
stage), so planned and executed FLOPs agree by construction.

The accounting is the usual one (Kaplan et al., nanoGPT):

1. *Forward* of a block, per token at context length ``n_ctx``: 2 FLOPs per weight of each of
   its Linear layers (a matmul of ``m x k`` by ``k x n`` costs ``2·m·n·k``), plus its attention
   products (QKᵀ and AV over the full context for softmax attention, no causal halving; see
   each attention's ``attention_flops_per_token``). Embedding lookups, norms, activations and
   softmax are free. The readout's forward is the LM head's matmul.
2. *Training* a token in a stage costs 3x the forward of the blocks it trains (backward is about
   twice the forward) plus the readout: 3x its forward when the stage trains the head's weight,
   2x (forward and the input gradient) when the head is the embedding, frozen after the first
   stage of a depth-wise run.
3. A *frozen trunk* costs its forward, and only where it runs: on every sample of a depth-wise
   stage without the activation cache; with the cache, once per sample of the pool when the
   cache is filled or extended over the blocks frozen since (`forward_flops_per_token` over
   those blocks). Reading the cache costs nothing.
4. Evaluation is not counted (so neither is the validation cache).

`stackwise.model.architecture.Rack.flops_per_token` (the forward of a whole rack) follows rule 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn


class Stage(Protocol):
    """What the rule needs to know of a stage (`stackwise.training.stages.StagePlan` has it)."""

    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def depthwise(self) -> bool: ...
    @property
    def trains_embedding(self) -> bool: ...


@dataclass(frozen=True)
class StageShape:
    """A stage as the rule sees it, before it is planned (blocks ``[start, end)``)."""

    start: int
    end: int
    depthwise: bool
    trains_embedding: bool


def linear_weight_count(module: nn.Module) -> int:
    """Number of matmul weights of the Linear layers in `module` (shared tensors once)."""
    weights = {id(m.weight): m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear)}
    return sum(weights.values())


def block_forward_flops(block: nn.Module, n_ctx: int) -> float:
    """Forward FLOPs per token of one block: 2 x matmul weights + its attention term."""
    attention = 0.0
    attn = getattr(block, "attn", None)
    if attn is not None and hasattr(attn, "attention_flops_per_token"):
        attention = float(attn.attention_flops_per_token(n_ctx))
    return 2.0 * linear_weight_count(block) + attention


def blocks_forward_flops(blocks: Sequence[nn.Module], n_ctx: int) -> float:
    return sum(block_forward_flops(b, n_ctx) for b in blocks)


def readout_forward_flops(rack: nn.Module) -> float:
    """Forward FLOPs per token of the LM head (the final norm is negligible)."""
    lm_head = rack.lm_head
    assert isinstance(lm_head, nn.Linear)
    return 2.0 * lm_head.weight.numel()


def readout_trained(rack: nn.Module, depthwise: bool, trains_embedding: bool) -> bool:
    """Whether a stage computes the LM head's weight gradient (3x its forward, else 2x): not in
    a later depth-wise stage when the head is the (then frozen) embedding."""
    return not (depthwise and not trains_embedding and bool(rack.tie_embeddings))


def _blocks(rack: nn.Module) -> list[nn.Module]:
    return list(getattr(rack, "blocks"))  # noqa: B009


def forward_flops_per_token(rack: nn.Module, begin: int, end: int, n_ctx: int) -> float:
    """Forward FLOPs per token of blocks ``[begin, end)`` run frozen (rule 3): the trunk below a
    stage, or the blocks an extension of the activation cache runs."""
    return blocks_forward_flops(_blocks(rack)[begin:end], n_ctx)


def train_flops_per_token(rack: nn.Module, stage: Stage, n_ctx: int) -> float:
    """FLOPs of training one token in `stage` (rule 2): its blocks and the readout."""
    factor = 3.0 if readout_trained(rack, stage.depthwise, stage.trains_embedding) else 2.0
    piece = forward_flops_per_token(rack, stage.start, stage.end, n_ctx)
    return 3.0 * piece + factor * readout_forward_flops(rack)


def runs_trunk(stage: Stage) -> bool:
    """Whether a stage has a frozen trunk below it (depth-wise, above the first block)."""
    return stage.depthwise and not stage.trains_embedding


def stage_flops(
    rack: nn.Module,
    stage: Stage,
    n_ctx: int,
    *,
    tokens: int,
    cached: bool,
    pool_tokens: int = 0,
    cache_from: int = 0,
) -> float:
    """FLOPs a stage executes training `tokens` tokens.

    A stage with a frozen trunk runs it on every token without the cache; with the cache
    (`cached`) it extends the cache, which holds the trunk's output through block `cache_from`,
    over the `pool_tokens` tokens of the sample pool instead. Linear in `tokens` and
    `pool_tokens`: the planner's cost of a step and of a pool sample are its values at one.
    """
    flops = train_flops_per_token(rack, stage, n_ctx) * tokens
    if runs_trunk(stage):
        if cached:
            flops += forward_flops_per_token(rack, cache_from, stage.start, n_ctx) * pool_tokens
        else:
            flops += forward_flops_per_token(rack, 0, stage.start, n_ctx) * tokens
    return flops
