"""What a stage trains, and how it starts.

`StageSetup` decides, for each planned stage (`stackwise.training.stages.StagePlan`):

1. *What trains* (`trainable`): everything is frozen, then the stage's parameters are
   unfrozen — a depth-wise piece with the readout (and the embedding in the stage that starts
   at block 0), or every parameter not declared frozen for the rackwise, progressive and
   fusion stages. Frozen parameters have ``requires_grad=False`` and are in eval mode (no
   dropout); the trained ones are in train mode, except stacks declared frozen.
2. *How it starts* (`initialise`, at the start of a stage only, never of a resumed one): a
   depth-wise piece as a copy of the piece before it (``depthwise.init: copy_previous``) and,
   with ``depthwise.head: fresh``, a head copied from the embedding; a progressive stage's new
   stacks by ``growth.init`` (copy the last, duplicate the middle, copy the whole trunk when
   doubling, or keep the seeded weights).
3. At the end of the run the parameters get their own ``requires_grad`` back and the rack its
   mode (`release`).

`StageForward` is the forward a stage trains: embedding or the trunk's output, the stage's
blocks, the readout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stackwise.config.base import TrainingConfig
from stackwise.training.stages import StagePlan, eligible_parameters, trainable_parameters


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


def stacks_in(rack: nn.Module, plan: StagePlan) -> list[nn.Module]:
    """The stacks whose blocks lie inside the stage's block range."""
    stacks, first = [], 0
    for stack in rack.stacks:  # type: ignore[union-attr]
        n = len(stack.blocks)
        if first + n <= plan.end and first >= plan.start:
            stacks.append(stack)
        first += n
    return stacks


class StageSetup:
    """The trainable set and the start of every stage of one run (see the module docstring).

    Built on the rack as the run trains it (its head already untied where the run unties it).
    """

    def __init__(self, rack: nn.Module, plans: list[StagePlan], settings: TrainingConfig) -> None:
        self.rack = rack
        self.plans = plans
        self.settings = settings
        self.eligible = eligible_parameters(rack)  # ids of the parameters that may train
        self.requires_grad = {id(p): p.requires_grad for p in rack.parameters()}
        self.was_training = rack.training

    def block_replaced(self, index: int, block: nn.Module) -> None:
        """A block module was swapped in (out of core): its parameters are new objects."""
        for param in block.parameters():
            self.requires_grad[id(param)] = param.requires_grad
            if param.requires_grad:
                self.eligible.add(id(param))

    def trainable(self, plan: StagePlan) -> list[nn.Parameter]:
        """Freeze the rack but what `plan` trains; the parameters it trains, each once."""
        rack = self.rack
        piecewise = plan.depthwise or plan.kind == "grow"  # a slice of the rack, not all of it
        if piecewise:
            params = trainable_parameters(
                rack, plan.start, plan.end, plan.trains_embedding, self.eligible
            )
        else:
            unique = {id(p): p for p in rack.parameters()}
            params = [p for p in unique.values() if id(p) in self.eligible]
        # Blocks away out of core are left as they are: each comes back as a new module.
        resident = rack.resident_modules()  # type: ignore[operator]
        for module in resident:
            for param in module.parameters():
                param.requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        for module in rack.resident_tree():  # type: ignore[operator]
            module.training = False
        if piecewise:
            for block in list(getattr(rack, "blocks"))[plan.start : plan.end]:  # noqa: B009
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

    @torch.no_grad()
    def initialise(
        self, plan: StagePlan, weights_of: Callable[[int], dict[str, torch.Tensor]]
    ) -> None:
        """How a stage starts (see the module docstring); `weights_of(i)` is block i's
        full-precision weights (a frozen block may be held in lower precision)."""
        if plan.kind == "grow":
            self._grow(plan)
            return
        if not plan.depthwise:
            return
        settings = self.settings.depthwise
        previous = self.plans[plan.index - 1] if plan.index > 0 else None
        if settings.init == "copy_previous" and previous is not None and previous.depthwise:
            blocks = list(getattr(self.rack, "blocks"))  # noqa: B009
            sources = range(previous.start, previous.end)
            for source, target in zip(sources, range(plan.start, plan.end), strict=True):
                blocks[target].load_state_dict(weights_of(source))
        if settings.head == "fresh" and not plan.trains_embedding:
            head = self.rack.get_parameter("lm_head.weight")
            head.copy_(self.rack.get_parameter("token_embedding.weight"))

    def _grow(self, plan: StagePlan) -> None:
        """Initialise the stacks a progressive stage adds (`training.growth.init`)."""
        if plan.index == 0:
            return
        stacks = list(self.rack.get_submodule("stacks").children())
        old = len(stacks_in(self.rack, self.plans[plan.index - 1]))
        new = len(stacks_in(self.rack, plan))
        growth = self.settings.growth
        if growth.init == "random":
            return  # the added stacks keep their seeded initialisation
        if growth.schedule == "doubling":
            # StackBERT / G_stack: the trained trunk is copied on top of itself.
            for offset in range(new - old):
                stacks[old + offset].load_state_dict(stacks[offset % old].state_dict())
            return
        if growth.init == "copy_last":
            stacks[old].load_state_dict(stacks[old - 1].state_dict())
            return
        # copy_middle (MIDAS): the middle trained stack is duplicated in place; the stacks
        # above it move up by one.
        middle = (old - 1) // 2
        for index in range(old, middle + 1, -1):
            stacks[index].load_state_dict(stacks[index - 1].state_dict())
        stacks[middle + 1].load_state_dict(stacks[middle].state_dict())

    def release(self) -> None:
        """Every parameter's own ``requires_grad`` and the rack's mode back."""
        for param in self.rack.parameters():
            param.requires_grad_(self.requires_grad.get(id(param), param.requires_grad))
        self.rack.train(self.was_training)
