"""The planner: which pieces of a Rack are trained in which order, for how long, at what lr.

- ``rackwise``: one stage, the whole rack (every stack not declared frozen) end to end.
- ``stackwise``: one stage per stack, left to right.
- ``blockwise`` (``layerwise``): one stage per block, left to right.
- ``progressive``: stage k trains the first n_k stacks end to end (embedding and head included,
  nothing frozen or cached); n_k grows 1, 2, … K (``growth.schedule: per_stack``) or 1, 2, 4 …
  K (``doubling``). Stage lengths follow ``growth.lengths``: equal, by trainable parameters,
  or ``{power: a}`` (stage i of n proportional to i**a).
- Stacks declared frozen (``freeze_blocks``) get no stage; they stay at their initialisation and
  are part of the frozen trunk of the stages after them.
- The total budget (``training.budget``: steps; tokens converted at ``batch_size x
  grad_accum_steps x seq_len`` tokens per step; or executed FLOPs) is split over the depth-wise
  stages: a stack with ``budget_fraction`` f gets f of it for its stage(s) (shared by its blocks
  in blockwise mode); the rest is shared by the other stages equally (``budget.split: equal``)
  or in proportion to their trainable parameters (``by_params``). Every stage gets at least one
  step and the stage steps add up to exactly the step budget (a budget smaller than the number
  of stages is an error). A FLOPs budget is split the same way and converted per stage with
  the rule the trainer meters with (`stackwise.training.flops`) — a step of the piece and
  readout, the frozen trunk's forward where it runs, and extending the activation cache over
  the sample pool once per stage — so the run ends within one optimizer step of the budget
  (`_steps_for_flops`).
- In depth-wise runs with ``depthwise.head`` untie or fresh, a tied LM head gets its own weight
  before planning (`prepare_rack`), so every stage trains it.
- A stack's ``lr`` overrides ``optimizer.lr`` for its stage(s).
- An enabled fusion phase (depth-wise modes only) adds a final stage that trains every piece not
  declared frozen jointly, for ``fusion.steps`` (or ``fusion.tokens``, or
  ``fusion.flops_fraction`` of a FLOPs budget, taken before the stages split the rest) at
  ``fusion.lr``
  (default ``optimizer.lr / 10``).

`stackwise.training.memory.estimate_run` plans a run the same way on a rack built on the meta
device to predict it before it runs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from stackwise.config.base import PowerLengths, StackConfig, StackWiseConfig
from stackwise.training.callbacks import StageInfo
from stackwise.training.flops import StageShape, runs_trunk, stage_flops


@dataclass(frozen=True)
class StagePlan:
    """One planned stage. Blocks ``[start, end)`` are trained; depth-wise stages run ``[0, end)``."""

    index: int
    name: str
    kind: str  # "block" | "stack" | "rack" | "fusion"
    start: int
    end: int
    steps: int
    lr: float
    trains_embedding: bool
    trainable_parameters: int
    depthwise: bool  # True: blocks before `start` are a frozen (cacheable) trunk
    total_stages: int

    def info(self) -> StageInfo:
        return StageInfo(
            index=self.index,
            name=self.name,
            kind=self.kind,
            trainable_blocks=(self.start, self.end),
            steps=self.steps,
            trainable_parameters=self.trainable_parameters,
            total_stages=self.total_stages,
        )


class _Piece(NamedTuple):
    name: str
    kind: str
    start: int
    end: int
    stack: int | None


def tokens_per_step(config: StackWiseConfig) -> int:
    t = config.training
    return t.batch_size * t.grad_accum_steps * t.seq_len


def _steps_for(steps: int | None, tokens: int | None, per_step: int) -> int:
    if steps is not None:
        return steps
    assert tokens is not None
    return max(1, round(tokens / per_step))


def _unique_params(params: list[nn.Parameter]) -> list[nn.Parameter]:
    unique: dict[int, nn.Parameter] = {}
    for param in params:
        unique.setdefault(id(param), param)
    return list(unique.values())


def _stack_structure(rack: nn.Module) -> list[tuple[int, int, bool]]:
    """(first block, block count, declared frozen) per stack."""
    structure = []
    start = 0
    for stack in rack.stacks:  # type: ignore[union-attr]
        n = len(stack.blocks)
        structure.append((start, n, bool(getattr(stack, "freeze_blocks", False))))
        start += n
    return structure


def trainable_parameters(
    rack: nn.Module, start: int, end: int, trains_embedding: bool, eligible: set[int] | None
) -> list[nn.Parameter]:
    """Parameters a stage trains: blocks [start, end) + readout (+ the embedding in stage 0).

    `eligible` holds the ids of parameters that may be trained at all (not declared frozen, not
    kept frozen by the model itself such as frozen up projections); None means all.
    """
    params: list[nn.Parameter] = []
    if trains_embedding:
        params.append(rack.token_embedding.weight)  # type: ignore[union-attr, arg-type]
    for block in rack.blocks[start:end]:  # type: ignore[index]
        params.extend(block.parameters())
    params.extend(rack.readout_parameters())  # type: ignore[operator]
    params = _unique_params(params)
    if eligible is not None:
        params = [p for p in params if id(p) in eligible]
    return params


def eligible_parameters(rack: nn.Module) -> set[int]:
    """Ids of parameters that may ever be trained (see `trainable_parameters`)."""
    frozen: set[int] = set()
    for stack in rack.stacks:  # type: ignore[union-attr]
        if getattr(stack, "freeze_blocks", False):
            frozen.update(id(p) for p in stack.parameters())
    return {id(p) for p in rack.parameters() if p.requires_grad and id(p) not in frozen}


def _allocate(weights: list[float], total: int) -> list[int]:
    """Integer steps proportional to `weights` summing to exactly `total` (largest remainder);
    a stage left without a step takes one from the stage with the most. `total` must be at
    least the number of stages."""
    n = len(weights)
    if total < n:
        raise ValueError(f"a budget of {total} step(s) cannot give each of {n} stages a step")
    norm = sum(weights)
    if norm <= 0:
        weights, norm = [1.0] * n, float(n)
    raw = [total * w / norm for w in weights]
    steps = [math.floor(r) for r in raw]
    for i in sorted(range(n), key=lambda i: raw[i] - steps[i], reverse=True)[: total - sum(steps)]:
        steps[i] += 1
    for i in range(n):
        if steps[i] == 0:
            steps[max(range(n), key=lambda j: steps[j])] -= 1
            steps[i] = 1
    return steps


class BudgetError(ValueError):
    """The budget cannot pay for the planned stages (names the budget field)."""


def _steps_for_flops(
    budget: float, shares: list[float], step_cost: list[float], pool_cost: list[float]
) -> list[int]:
    """Steps per stage for a FLOPs budget.

    Stage i costs ``steps_i * step_cost[i]`` plus, for a cached depth-wise stage, extending
    the activation cache over the whole sample pool once: ``pool_steps * pool_cost[i]``, where
    ``pool_steps = max(steps)`` (the pool holds what the longest stage visits). Each stage gets
    its share of the budget; what flooring leaves over goes, one step at a time, to the stages
    furthest below their share, so the run ends within one optimizer step of the budget.
    """
    n = len(shares)
    extension = sum(pool_cost)
    minimum = sum(step_cost) + extension
    if minimum > budget:
        raise BudgetError(
            f"training.budget.flops: {budget:.3g} FLOPs cannot pay for one step of each of the "
            f"{n} stage(s), which costs {minimum:.3g}; raise the budget"
        )
    # Every stage is guaranteed one step; the rest of the budget follows the shares.
    targets = [
        step_cost[i] + pool_cost[i] + (budget - minimum) * share for i, share in enumerate(shares)
    ]

    def steps_given_pool(pool: int) -> list[int]:
        return [
            max(1, math.floor((targets[i] - pool_cost[i] * pool) / step_cost[i])) for i in range(n)
        ]

    # The smallest pool size that the steps it allows do not outgrow (steps fall as it grows).
    low, high = 1, max(1, max(math.floor(t / c) for t, c in zip(targets, step_cost, strict=True)))
    while low < high:
        middle = (low + high) // 2
        if max(steps_given_pool(middle)) <= middle:
            high = middle
        else:
            low = middle + 1
    steps = steps_given_pool(low)

    def total(steps: list[int]) -> float:
        return sum(s * c for s, c in zip(steps, step_cost, strict=True)) + max(steps) * extension

    spent = total(steps)
    while spent > budget:  # stages held at their one-step minimum overspent: take it back
        over = [i for i in range(n) if steps[i] > 1]
        i = max(over, key=lambda i: steps[i] * step_cost[i] - targets[i])
        steps[i] -= 1
        spent = total(steps)
    while True:
        pool = max(steps)
        order = sorted(range(n), key=lambda i: targets[i] - steps[i] * step_cost[i], reverse=True)
        for i in order:
            extra = step_cost[i] + (extension if steps[i] + 1 > pool else 0.0)
            if spent + extra <= budget:
                steps[i] += 1
                spent += extra
                break
        else:
            return steps


def unties_head(config: StackWiseConfig) -> bool:
    """Whether a depth-wise run gives a tied LM head its own weight (`depthwise.head`)."""
    training = config.training
    return training.is_depthwise and training.depthwise.head != "frozen"


def prepare_rack(config: StackWiseConfig, rack: nn.Module) -> None:
    """Shape changes a run makes before training: untie the head of a depth-wise run."""
    if unties_head(config):
        rack.untie_head()  # type: ignore[operator]


def _stage_costs(
    config: StackWiseConfig, rack: nn.Module, pieces: list[_Piece], per_step: int
) -> tuple[list[float], list[float]]:
    """Per stage: FLOPs of one optimizer step, and FLOPs per pool step of extending the cache
    (`stackwise.training.flops.stage_flops` at one step and at one pool step), for full
    sequences."""
    training = config.training
    depthwise = training.is_depthwise
    cached = depthwise and training.depthwise.data == "pool" and training.cache.enabled
    seq = training.seq_len
    step_cost: list[float] = []
    pool_cost: list[float] = []
    boundary = 0  # the cache holds the trunk's output through this block
    for piece in pieces:
        stage = StageShape(piece.start, piece.end, depthwise, piece.start == 0)
        for tokens, pool_tokens, costs in ((per_step, 0, step_cost), (0, per_step, pool_cost)):
            costs.append(
                stage_flops(
                    rack,
                    stage,
                    seq,
                    tokens=tokens,
                    cached=cached,
                    pool_tokens=pool_tokens,
                    cache_from=boundary,
                )
            )
        if cached and runs_trunk(stage):
            boundary = piece.start
    return step_cost, pool_cost


def plan_stages(config: StackWiseConfig, rack: nn.Module) -> list[StagePlan]:
    """The stages of a run of `rack` under `config` (see the module docstring)."""
    training = config.training
    per_step = tokens_per_step(config)
    total_steps = (
        0
        if training.budget.flops is not None
        else _steps_for(training.budget.steps, training.budget.tokens, per_step)
    )
    base_lr = training.optimizer.lr
    structure = _stack_structure(rack)
    n_blocks = sum(n for _, n, _ in structure)
    eligible = eligible_parameters(rack)
    # Per-stack training options apply when the config lists the rack's stacks explicitly.
    stack_options: list[StackConfig | None] = [None] * len(structure)
    if config.model.stacks is not None and len(config.model.stacks) == len(structure):
        stack_options = list(config.model.stacks)

    def count(start: int, end: int, embedding: bool) -> int:
        return sum(p.numel() for p in trainable_parameters(rack, start, end, embedding, eligible))

    raw: list[_Piece] = []
    mode = training.training_architecture
    if mode == "rackwise":
        raw.append(_Piece("rack", "rack", 0, n_blocks, None))
    elif mode == "progressive":
        for size in config.growth_sizes():
            end = structure[size - 1][0] + structure[size - 1][1]
            raw.append(_Piece(f"stacks_{size}", "grow", 0, end, None))
    else:
        for stack_index, (first, n, frozen) in enumerate(structure):
            if frozen:
                continue
            if mode == "stackwise":
                raw.append(_Piece(f"stack_{stack_index}", "stack", first, first + n, stack_index))
            else:
                for block in range(first, first + n):
                    raw.append(_Piece(f"block_{block}", "block", block, block + 1, stack_index))
    if not raw:
        raise ValueError(
            "model.stacks: every stack is declared frozen (freeze_blocks), nothing to train"
        )

    # Budget split.
    params = [count(r.start, r.end, r.kind == "grow") for r in raw]
    shares: list[float | None] = [None] * len(raw)
    for i, r in enumerate(raw):
        option = stack_options[r.stack] if r.stack is not None else None
        if option is not None and option.budget_fraction is not None:
            siblings = [j for j, other in enumerate(raw) if other.stack == r.stack]
            if training.budget.split == "by_params":
                sibling_params = sum(params[j] for j in siblings)
                shares[i] = option.budget_fraction * params[i] / max(1, sibling_params)
            else:
                shares[i] = option.budget_fraction / len(siblings)
    fixed = sum(s for s in shares if s is not None)
    free = [i for i, s in enumerate(shares) if s is None]
    left = max(0.0, 1.0 - fixed)
    free_weight = (
        sum(params[i] for i in free) if training.budget.split == "by_params" else len(free)
    )
    for i in free:
        weight = params[i] if training.budget.split == "by_params" else 1
        shares[i] = left * weight / max(1, free_weight)
    weights = [float(s or 0.0) for s in shares]
    if mode == "progressive":
        lengths = training.growth.lengths
        if lengths == "by_params":
            weights = [float(p) for p in params]
        elif isinstance(lengths, PowerLengths):
            weights = [float(i) ** lengths.power for i in range(1, len(raw) + 1)]
        else:
            weights = [1.0] * len(raw)
    depthwise = training.is_depthwise
    fusion = training.fusion
    fusion_steps = 0
    if training.budget.flops is not None:
        budget = training.budget.flops
        if depthwise and fusion.enabled and fusion.flops_fraction is not None:
            # The fusion phase trains the whole rack: its steps cost a full training step.
            whole = StageShape(0, n_blocks, depthwise=False, trains_embedding=True)
            full_step = stage_flops(rack, whole, training.seq_len, tokens=per_step, cached=False)
            fusion_steps = max(1, math.floor(budget * fusion.flops_fraction / full_step))
            budget -= fusion_steps * full_step
        norm = sum(weights) or 1.0
        step_cost, pool_cost = _stage_costs(config, rack, raw, per_step)
        stage_steps = _steps_for_flops(budget, [w / norm for w in weights], step_cost, pool_cost)
    else:
        try:
            stage_steps = _allocate(weights, total_steps)
        except ValueError as error:
            field = "steps" if training.budget.steps is not None else "tokens"
            raise BudgetError(f"training.budget.{field}: {error}; raise the budget") from error

    if depthwise and raw and raw[0].start != 0:
        # Backward never goes below the trainable piece, so nothing can train the embedding.
        warnings.warn(
            f"the rack starts with {raw[0].start} block(s) declared frozen: depth-wise training "
            "never trains the token embedding (nor a tied LM head) before "
            + ("the fusion phase" if fusion.enabled else "the end; enable training.fusion"),
            UserWarning,
            stacklevel=2,
        )
    total = len(raw) + (1 if fusion.enabled and depthwise else 0)
    plans = []
    for i, r in enumerate(raw):
        start, end = r.start, r.end
        option = stack_options[r.stack] if r.stack is not None else None
        trains_embedding = start == 0
        plans.append(
            StagePlan(
                index=i,
                name=r.name,
                kind=r.kind,
                start=start,
                end=end,
                steps=stage_steps[i],
                lr=option.lr if option is not None and option.lr is not None else base_lr,
                trains_embedding=trains_embedding,
                trainable_parameters=count(start, end, trains_embedding)
                if depthwise or r.kind == "grow"
                else sum(
                    p.numel() for p in _unique_params(list(rack.parameters())) if id(p) in eligible
                ),
                depthwise=depthwise,
                total_stages=total,
            )
        )
    if fusion.enabled and depthwise:
        plans.append(
            StagePlan(
                index=len(plans),
                name="fusion",
                kind="fusion",
                start=0,
                end=n_blocks,
                steps=fusion_steps or _steps_for(fusion.steps, fusion.tokens, per_step),
                lr=fusion.lr if fusion.lr is not None else base_lr / 10,
                trains_embedding=True,
                trainable_parameters=sum(
                    p.numel() for p in _unique_params(list(rack.parameters())) if id(p) in eligible
                ),
                depthwise=False,
                total_stages=total,
            )
        )
    return plans


def pool_micro_batches(plans: list[StagePlan], grad_accum_steps: int) -> int:
    """Micro-batches in the fixed sample pool shared by the depth-wise stages (0: none)."""
    steps = [p.steps for p in plans if p.depthwise]
    return max(steps, default=0) * grad_accum_steps
