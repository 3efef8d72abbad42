"""Progressive growth: stage k trains the first stacks end to end; new stacks start as copies
(or from their seeded initialisation); doubling; stage lengths; FLOPs against rackwise."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import stackwise.training.architecture_trainer as trainer_module
from stackwise.config.base import StackWiseConfig
from stackwise.data import build_data
from stackwise.model.architecture import create_rack_from_config
from stackwise.training.architecture_trainer import ArchitectureTrainer
from stackwise.training.callbacks import StageInfo, StageResult, TrainingCallback
from stackwise.training.plan import plan_stages


def config_for(n_stacks: int = 4, steps: int = 16, **growth: Any) -> StackWiseConfig:
    return StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": 32,
                "n_heads": 2,
                "architecture": {"n_stacks": n_stacks, "blocks_per_stack": 1},
            },
            "training": {
                "training_architecture": "progressive",
                "growth": growth,
                "batch_size": 4,
                "seq_len": 32,
                "budget": {"steps": steps},
                "optimizer": {"lr": 3e-3},
                "log_every_steps": 1,
                "eval": {"batches": 1},
            },
            "data": {"max_tokens": 30_000},
        }
    )


class Stacks(TrainingCallback):
    """Each stack's weights at every stage start and end, and the stages' plans."""

    def __init__(self, rack: torch.nn.Module) -> None:
        self.rack = rack
        self.starts: list[list[dict[str, torch.Tensor]]] = []
        self.ends: list[list[dict[str, torch.Tensor]]] = []
        self.stages: list[StageInfo] = []
        self.results: list[StageResult] = []

    def _state(self) -> list[dict[str, torch.Tensor]]:
        return [
            {k: v.detach().clone() for k, v in stack.state_dict().items()}
            for stack in self.rack.stacks
        ]

    def on_stage_start(self, stage: StageInfo, step: int) -> None:
        self.stages.append(stage)
        self.starts.append(self._state())

    def on_stage_end(self, result: StageResult, step: int) -> None:
        self.ends.append(self._state())
        self.results.append(result)


def train(config: StackWiseConfig) -> tuple[torch.nn.Module, Stacks, Any]:
    data = build_data(config.data, config.training)
    rack = create_rack_from_config(config)
    stacks = Stacks(rack)
    results = ArchitectureTrainer(config, callbacks=[stacks]).train_architecture(
        rack, data.train_loader, data.val_loader
    )
    return rack, stacks, results


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_copy_last_starts_the_new_stack_as_the_last_trained_one() -> None:
    _, stacks, _ = train(config_for(init="copy_last"))
    for k in range(1, 4):
        assert same(stacks.starts[k][k], stacks.ends[k - 1][k - 1])
        # the stacks trained before are carried over unchanged
        for j in range(k):
            assert same(stacks.starts[k][j], stacks.ends[k - 1][j])


def test_copy_middle_duplicates_the_middle_stack_in_place() -> None:
    _, stacks, _ = train(config_for(init="copy_middle"))
    # Growing from 3 to 4 stacks: the middle one (index 1) is duplicated, 2 moves up to 3.
    before, after = stacks.ends[2], stacks.starts[3]
    assert same(after[0], before[0])
    assert same(after[1], before[1])
    assert same(after[2], before[1])
    assert same(after[3], before[2])
    # From 2 to 3: middle of (0, 1) is 0.
    assert same(stacks.starts[2][1], stacks.ends[1][0])
    assert same(stacks.starts[2][2], stacks.ends[1][1])


def test_random_growth_keeps_the_seeded_initialisation() -> None:
    _, stacks, _ = train(config_for(init="random"))
    initial = stacks.starts[0]
    for k in range(1, 4):
        assert same(stacks.starts[k][k], initial[k])


def test_doubling_grows_one_two_four_stacks_by_copying_the_trunk() -> None:
    _, stacks, _ = train(config_for(schedule="doubling", steps=12))
    assert [s.trainable_blocks for s in stacks.stages] == [(0, 1), (0, 2), (0, 4)]
    assert same(stacks.starts[1][1], stacks.ends[0][0])
    assert same(stacks.starts[2][2], stacks.ends[1][0])
    assert same(stacks.starts[2][3], stacks.ends[1][1])


def test_every_parameter_of_the_grown_trunk_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    given: list[set[int]] = []
    real = trainer_module.build_optimizer

    def recording(params: list[torch.nn.Parameter], *args: Any) -> Any:
        given.append({id(p) for p in params})
        return real(params, *args)

    monkeypatch.setattr(trainer_module, "build_optimizer", recording)
    rack, stacks, _ = train(config_for())
    readout = {id(rack.token_embedding.weight), id(rack.norm.weight)}  # head tied: embedding
    for k, params in enumerate(given):
        expected = set(readout)
        for stack in list(rack.stacks)[: k + 1]:
            expected |= {id(p) for p in stack.parameters()}
        assert params == expected, f"stage {k}"
        for j in range(k + 1):  # every trained stack moved in stage k
            before, after = stacks.starts[k][j], stacks.ends[k][j]
            for key in before:
                assert not torch.equal(before[key], after[key]), (k, j, key)
        for j in range(k + 1, 4):  # the rest waits, untouched
            assert same(stacks.starts[k][j], stacks.ends[k][j])


@pytest.mark.parametrize(
    ("growth", "expected"),
    [
        ({}, [25, 25, 25, 25]),
        ({"lengths": {"power": 1.0}}, [10, 20, 30, 40]),  # stage i of 4 gets i/10
        ({"lengths": {"power": 2.0}}, [3, 13, 30, 54]),  # i^2/30: 3.3, 13.3, 30, 53.3
        ({"schedule": "doubling"}, [34, 33, 33]),
    ],
)
def test_stage_lengths_follow_the_rule_and_add_up(
    growth: dict[str, Any], expected: list[int]
) -> None:
    config = config_for(steps=100, **growth)
    plans = plan_stages(config, create_rack_from_config(config))
    assert [p.steps for p in plans] == expected
    assert sum(p.steps for p in plans) == 100


def test_progressive_flops_against_rackwise_by_hand() -> None:
    # 4 stacks of one block, 4 steps per stage; rackwise of the same 16 steps.
    _, _, grown = train(config_for(steps=16))
    rackwise = config_for(steps=16).model_copy(deep=True)
    rackwise.training.training_architecture = "rackwise"
    _, _, full = train(rackwise)
    d, vocab, seq, tokens = 32, 260, 32, 4 * 32
    block = 2 * (4 * d * d + 3 * d * 88) + 4 * seq * d  # matmuls + QK^T/AV over the context
    head = 2 * d * vocab
    expected_grown = sum(4 * (3 * k * block + 3 * head) * tokens for k in (1, 2, 3, 4))
    expected_full = 16 * (3 * 4 * block + 3 * head) * tokens
    assert grown.flops == pytest.approx(expected_grown)
    assert full.flops == pytest.approx(expected_full)
    assert grown.flops / full.flops == pytest.approx(expected_grown / expected_full)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"growth": {"schedule": "doubling"}}, r"training.growth.schedule.*power-of-two.*has 3"),
        ({"fusion": {"enabled": True, "steps": 2}}, r"training.fusion.enabled"),
    ],
)
def test_progressive_settings_are_validated(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StackWiseConfig.from_dict(
            {
                "model": {"architecture": {"n_stacks": 3, "blocks_per_stack": 1}},
                "training": {"training_architecture": "progressive", **settings},
            }
        )
