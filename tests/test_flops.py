"""Executed FLOPs against a count by hand.

The convention (`stackwise.training.metrics`): a matmul of an ``m x k`` by a ``k x n`` matrix
costs ``2·m·n·k`` FLOPs; per token that is 2 FLOPs per weight of each Linear layer, plus the
attention products QKᵀ and AV over the full context (no causal halving); embedding lookups,
norms, activations and softmax are free. A trainable piece costs 3x its forward (backward about
2x); the LM head 3x when its weight is trained, 2x (forward and input gradient) when it is the
frozen embedding; a frozen trunk costs its forward once per sample it runs on (every step
without the cache, once per pool sample when the cache is filled or extended). Evaluation is
not counted (so neither is the validation cache).

Every number below is written out from the shapes of the tiny model, not taken from the code.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.model.architecture import create_rack_from_config
from stackwise.training.architecture_trainer import ArchitectureTrainer
from stackwise.training.flops import (
    StageShape,
    forward_flops_per_token,
    stage_flops,
    train_flops_per_token,
)
from stackwise.training.plan import estimate_run

D_MODEL, HEADS, VOCAB, BATCH, SEQ = 32, 2, 260, 4, 16
HEAD_DIM = D_MODEL // HEADS  # 16
D_FF = 88  # SwiGLU width: 8/3 x 32 = 85.3, rounded up to a multiple of 8

# Forward FLOPs per token of one block, matmul by matmul.
QKV = 2 * D_MODEL * (3 * D_MODEL)  # x [T, 32] @ W_qkv [32, 96]
OUT = 2 * D_MODEL * D_MODEL  # attention output [T, 32] @ W_o [32, 32]
SCORES = HEADS * 2 * HEAD_DIM * SEQ  # per head, q [1, 16] @ kᵀ [16, T]
VALUES = HEADS * 2 * SEQ * HEAD_DIM  # per head, p [1, T] @ v [T, 16]
FFN = 3 * 2 * D_MODEL * D_FF  # gate and up [32 -> 88], down [88 -> 32]
BLOCK = QKV + OUT + SCORES + VALUES + FFN
HEAD = 2 * D_MODEL * VOCAB  # h [T, 32] @ W_headᵀ [32, 260]
MICRO_TOKENS = BATCH * SEQ


def config_for(
    mode: str, steps: int, grad_accum: int, stacks: tuple[int, int] = (3, 1), **training: Any
) -> StackWiseConfig:
    return StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": D_MODEL,
                "n_heads": HEADS,
                "vocab_size": VOCAB,
                "architecture": {"n_stacks": stacks[0], "blocks_per_stack": stacks[1]},
            },
            "training": {
                "training_architecture": mode,
                "batch_size": BATCH,
                "seq_len": SEQ,
                "grad_accum_steps": grad_accum,
                "budget": {"steps": steps},
                "log_every_steps": 1,
                **training,
            },
        }
    )


def executed(config: StackWiseConfig) -> tuple[list[float], float]:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (BATCH, SEQ), generator=generator) for _ in range(40)]
    rack = create_rack_from_config(config)
    results = ArchitectureTrainer(config).train_architecture(rack, batches)
    return [s.flops for s in results.stages], results.flops


def test_blockwise_with_the_cache() -> None:
    # 3 blocks, 6 steps: 2 steps of 2 micro-batches per stage; the pool is the 4 micro-batches
    # of the longest stage (256 tokens), visited by every stage.
    config = config_for("blockwise", steps=6, grad_accum=2)
    tokens = 2 * 2 * MICRO_TOKENS  # trained tokens per stage
    pool = 4 * MICRO_TOKENS
    train = (3 * BLOCK + 3 * HEAD) * tokens  # the untied head trains in every stage
    by_hand = [
        train,  # block 0 (and the embedding) from the token ids: no trunk
        train + BLOCK * pool,  # block 1: the cache is filled through block 0, once
        train + BLOCK * pool,  # block 2: the cache is extended through block 1, once
    ]
    stages, total = executed(config)
    assert stages == by_hand
    assert total == sum(by_hand)
    assert [s.flops for s in estimate_run(config).stages] == by_hand


def test_blockwise_fresh_data_with_the_frozen_head() -> None:
    # Without a pool every step runs the frozen trunk; the head is the embedding, frozen
    # after the first stage, so later stages compute only its input gradient.
    config = config_for(
        "blockwise", steps=6, grad_accum=1, depthwise={"data": "fresh", "head": "frozen"}
    )
    tokens = 2 * MICRO_TOKENS
    by_hand = [
        (3 * BLOCK + 3 * HEAD) * tokens,
        (3 * BLOCK + 2 * HEAD + 1 * BLOCK) * tokens,  # trunk: block 0 on every sample
        (3 * BLOCK + 2 * HEAD + 2 * BLOCK) * tokens,  # trunk: blocks 0 and 1
    ]
    stages, total = executed(config)
    assert stages == by_hand
    assert total == sum(by_hand)
    assert [s.flops for s in estimate_run(config).stages] == by_hand


def test_rackwise() -> None:
    # One stage, 3 steps of one micro-batch: every block and the (tied) head train.
    config = config_for("rackwise", steps=3, grad_accum=1)
    by_hand = [(3 * 3 * BLOCK + 3 * HEAD) * 3 * MICRO_TOKENS]
    stages, total = executed(config)
    assert stages == by_hand
    assert total == sum(by_hand)
    assert [s.flops for s in estimate_run(config).stages] == by_hand


def test_the_rack_forward_is_the_blocks_and_the_readout() -> None:
    """`Rack.flops_per_token` (the model's own formula) is rule 1 over the whole rack."""
    rack = create_rack_from_config(config_for("rackwise", steps=1, grad_accum=1))
    assert rack.flops_per_token(SEQ) == 3 * BLOCK + HEAD


DEPTHWISE = [
    (mode, {"depthwise": {"data": data, "head": head}})
    for mode in ("stackwise", "blockwise")
    for data in ("pool", "fresh")
    for head in ("untie", "fresh", "frozen")
]


@pytest.mark.parametrize(
    ("mode", "settings"),
    [
        ("rackwise", {}),
        *DEPTHWISE,
        ("blockwise", {"cache": {"enabled": False}}),
        ("blockwise", {"fusion": {"enabled": True, "steps": 2}}),
        ("progressive", {"growth": {"schedule": "per_stack"}}),
        ("progressive", {"growth": {"schedule": "doubling"}}),
    ],
)
def test_planned_and_executed_flops_agree_stage_by_stage(
    mode: str, settings: dict[str, Any]
) -> None:
    """The planner predicts every stage's FLOPs as the trainer meters them, for every mode,
    data policy, head policy and growth schedule (both use `stackwise.training.flops`)."""
    stacks = (2, 2) if mode == "stackwise" else (4, 1)
    config = config_for(mode, steps=8, grad_accum=2, stacks=stacks, **settings)
    stages, total = executed(config)
    planned = estimate_run(config)
    assert len(stages) == len(planned.stages) >= (1 if mode == "rackwise" else 2)
    assert stages == [s.flops for s in planned.stages]
    assert total == planned.flops


def test_the_rule_per_token() -> None:
    """The rule's own functions on the tiny rack: a later depth-wise stage with the head tied
    (the frozen embedding) trains its block 3x and the head 2x; the first stage, the head 3x."""
    config = config_for("blockwise", steps=3, grad_accum=1, depthwise={"head": "frozen"})
    rack = create_rack_from_config(config)
    later = StageShape(1, 2, depthwise=True, trains_embedding=False)
    first = StageShape(0, 1, depthwise=True, trains_embedding=True)
    assert train_flops_per_token(rack, later, SEQ) == 3 * BLOCK + 2 * HEAD
    assert train_flops_per_token(rack, first, SEQ) == 3 * BLOCK + 3 * HEAD
    assert forward_flops_per_token(rack, 0, 3, SEQ) == 3 * BLOCK
    cached = stage_flops(rack, later, SEQ, tokens=10, cached=True, pool_tokens=7, cache_from=0)
    fresh = stage_flops(rack, later, SEQ, tokens=10, cached=False)
    assert cached == (3 * BLOCK + 2 * HEAD) * 10 + BLOCK * 7
    assert fresh == (3 * BLOCK + 2 * HEAD + BLOCK) * 10
