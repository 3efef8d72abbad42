"""Depth-wise runs on equal terms: the head every stage trains, growth by copying, the data
policy and its unique-token count, step budgets that add up and FLOPs-matched budgets."""

from __future__ import annotations

import itertools
import time
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


def config_for(mode: str = "blockwise", steps: int = 12, **training: Any) -> StackWiseConfig:
    model = {
        "d_model": 32,
        "n_heads": 2,
        "architecture": {"n_stacks": 2, "blocks_per_stack": 2},
        **training.pop("model", {}),
    }
    budget = training.pop("budget", {"steps": steps})
    return StackWiseConfig.from_dict(
        {
            "model": model,
            "training": {
                "training_architecture": mode,
                "batch_size": 4,
                "seq_len": 32,
                "budget": budget,
                "optimizer": {"lr": 3e-3},
                "schedule": {"warmup_fraction": 0.0},
                "log_every_steps": 1,
                "eval": {"batches": 2},
                **training,
            },
            "data": {"max_tokens": 40_000},
        }
    )


class StageStates(TrainingCallback):
    """Copies of the rack's weights at every stage start and end."""

    def __init__(self, rack: torch.nn.Module) -> None:
        self.rack = rack
        self.starts: dict[str, dict[str, torch.Tensor]] = {}
        self.ends: dict[str, dict[str, torch.Tensor]] = {}
        self.results: list[StageResult] = []

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.rack.state_dict().items()}

    def on_stage_start(self, stage: StageInfo, step: int) -> None:
        self.starts[stage.name] = self._state()

    def on_stage_end(self, result: StageResult, step: int) -> None:
        self.ends[result.stage.name] = self._state()
        self.results.append(result)


def train(config: StackWiseConfig, loader: Any = None) -> tuple[Any, StageStates, Any]:
    data = build_data(config.data, config.training)
    rack = create_rack_from_config(config)
    states = StageStates(rack)
    results = ArchitectureTrainer(config, callbacks=[states]).train_architecture(
        rack, data.train_loader if loader is None else loader, data.val_loader
    )
    return rack, states, results


def test_default_blockwise_trains_a_head_in_every_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    # Which tensors each stage's optimizer was given (the real optimizer is still built).
    given: list[set[int]] = []
    real = trainer_module.build_optimizer

    def recording(params: list[torch.nn.Parameter], *args: Any) -> Any:
        given.append({id(p) for p in params})
        return real(params, *args)

    monkeypatch.setattr(trainer_module, "build_optimizer", recording)
    config = config_for("blockwise", steps=40)
    rack, states, _ = train(config)
    assert config.model.tie_embeddings  # the default: tied, and untied for depth-wise training
    head, embedding = rack.lm_head.weight, rack.token_embedding.weight
    assert head is not embedding and not rack.tie_embeddings
    assert rack.spec()["tie_embeddings"] is False  # a saved rack rebuilds untied
    assert len(given) == 4
    for index, params in enumerate(given):
        assert id(head) in params, f"stage {index} does not train the head"
        assert (id(embedding) in params) == (index == 0)
    # The head changed in every later stage, the embedding stayed as stage 1 left it.
    for k in range(1, 4):
        before, after = states.starts[f"block_{k}"], states.ends[f"block_{k}"]
        assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
        assert torch.equal(before["token_embedding.weight"], after["token_embedding.weight"])


def test_validation_loss_keeps_falling_after_the_first_stage() -> None:
    _, states, _ = train(config_for("blockwise", steps=160))
    val = [r.val_loss for r in states.results]
    assert all(v is not None for v in val)
    assert val[-1] < val[0] - 0.05, val


def test_frozen_head_is_the_embedding_and_trains_only_in_stage_one() -> None:
    rack, states, _ = train(config_for("blockwise", steps=8, depthwise={"head": "frozen"}))
    assert rack.lm_head.weight is rack.token_embedding.weight
    for k in range(1, 4):
        before, after = states.starts[f"block_{k}"], states.ends[f"block_{k}"]
        assert torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_fresh_head_starts_every_stage_from_the_embedding() -> None:
    _, states, _ = train(config_for("blockwise", steps=8, depthwise={"head": "fresh"}))
    for k in range(1, 4):
        start = states.starts[f"block_{k}"]
        assert torch.equal(start["lm_head.weight"], start["token_embedding.weight"])
        previous_end = states.ends[f"block_{k - 1}"]
        assert not torch.equal(start["lm_head.weight"], previous_end["lm_head.weight"])


def test_rackwise_keeps_a_tied_head() -> None:
    rack, _, _ = train(config_for("rackwise", steps=2))
    assert rack.lm_head.weight is rack.token_embedding.weight


@pytest.mark.parametrize("mode", ["blockwise", "stackwise"])
def test_copy_previous_starts_a_piece_as_the_trained_piece_before_it(mode: str) -> None:
    config = config_for(mode, steps=8, depthwise={"init": "copy_previous"})
    rack, states, _ = train(config)
    blocks_per_piece = 1 if mode == "blockwise" else 2
    names = list(states.starts)
    for previous, current in itertools.pairwise(names):
        start, trained = states.starts[current], states.ends[previous]
        k = names.index(current)
        for offset in range(blocks_per_piece):
            source = (k - 1) * blocks_per_piece + offset
            target = k * blocks_per_piece + offset
            src = _block_state(rack, trained, source)
            dst = _block_state(rack, start, target)
            assert src.keys() == dst.keys()
            for key in src:
                assert torch.equal(src[key], dst[key]), (current, key)


def _block_state(
    rack: torch.nn.Module, state: dict[str, torch.Tensor], index: int
) -> dict[str, torch.Tensor]:
    names = {id(m): n for n, m in rack.named_modules()}
    prefix = names[id(rack.blocks[index])] + "."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def test_copy_previous_needs_pieces_of_the_same_shape() -> None:
    with pytest.raises(ValueError, match=r"training.depthwise.init.*model.stacks.1.*d_ff"):
        StackWiseConfig.from_dict(
            {
                "model": {"stacks": [{"n_blocks": 1}, {"n_blocks": 1, "d_ff": 64}]},
                "training": {
                    "training_architecture": "blockwise",
                    "depthwise": {"init": "copy_previous"},
                },
            }
        )


class Numbered:
    """A dataset of distinct batches; records which batch numbers were read."""

    def __init__(self, n: int, batch: int = 4, seq: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(0, 256, (batch, seq), generator=generator) for _ in range(n)]
        self.read: list[int] = []

    def __iter__(self) -> Any:
        for number, batch in enumerate(self.batches):
            self.read.append(number)
            yield batch


@pytest.mark.parametrize(
    ("mode", "data", "reads", "unique"),
    [
        # 4 blocks x 3 steps: one pool of 3 batches visited by every stage
        ("blockwise", "pool", [0, 1, 2], 3),
        # every stage reads 3 new batches
        ("blockwise", "fresh", list(range(12)), 12),
        ("rackwise", "pool", list(range(12)), 12),
    ],
)
def test_data_policy_and_unique_tokens(mode: str, data: str, reads: list[int], unique: int) -> None:
    config = config_for(mode, steps=12, depthwise={"data": data})
    loader = Numbered(40)
    _, _, results = train(config, loader)
    assert loader.read == reads
    assert results.total_tokens == 12 * 4 * 32
    assert results.extra["tokens_seen"] == 12 * 4 * 32
    assert results.extra["unique_tokens"] == unique * 4 * 32


def test_unique_tokens_stop_at_the_size_of_the_data() -> None:
    loader = Numbered(5)  # 12 steps read the 5 batches more than twice
    _, _, results = train(config_for("rackwise", steps=12), loader)
    assert results.extra["unique_tokens"] == 5 * 4 * 32


@pytest.mark.parametrize(
    ("steps", "fraction", "expected"),
    [(10, None, [3, 3, 2, 2]), (4, None, [1, 1, 1, 1]), (10, 1.0, [4, 4, 1, 1])],
)
def test_stage_steps_add_up_to_the_budget(
    steps: int, fraction: float | None, expected: list[int]
) -> None:
    stacks = [{"n_blocks": 2, "budget_fraction": fraction}, {"n_blocks": 2}]
    config = config_for("blockwise", steps=steps, model={"stacks": stacks})
    rack = create_rack_from_config(config)
    plans = plan_stages(config, rack)
    assert [p.steps for p in plans] == expected
    assert sum(p.steps for p in plans) == steps


def test_a_budget_smaller_than_the_stages_is_a_validation_error() -> None:
    with pytest.raises(ValueError, match=r"training.budget.steps.*2 optimizer step.*4 stages"):
        config_for("blockwise", steps=2)


@pytest.mark.parametrize("mode", ["rackwise", "stackwise", "blockwise"])
@pytest.mark.parametrize("data", ["pool", "fresh"])
def test_a_flops_budget_ends_within_one_step(mode: str, data: str) -> None:
    budget = 4.0e9
    config = config_for(mode, budget={"flops": budget}, depthwise={"data": data})
    _, states, results = train(config)
    # One optimizer step of the costliest stage, counted by hand: 3x the forward of the
    # piece and the readout plus the trunk's forward, each 2 FLOPs per weight per token.
    d, vocab, tokens = 32, 260, 4 * 32
    d_ff = 88  # 8/3 * 32 rounded up to a multiple of 8
    attention = 2 * 2 * 32 * d  # QK^T and AV over the full context, per token
    block = 2 * (4 * d * d + 3 * d * d_ff) + attention
    head = 2 * d * vocab
    piece = {"rackwise": 4, "stackwise": 2, "blockwise": 1}[mode]
    trunk = 3 if mode == "blockwise" else (2 if mode == "stackwise" else 0)
    step = (3 * piece * block + 3 * head + trunk * block) * tokens
    assert results.flops <= budget
    assert budget - results.flops < step
    assert sum(r.flops for r in states.results) == pytest.approx(results.flops)


class SlowEvaluation(TrainingCallback):
    """Takes `seconds` over every validation report, as a slow evaluation would."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.reports = 0
        self.rates: list[float] = []

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "train/tokens_per_s" in metrics:
            self.rates.append(metrics["train/tokens_per_s"])
        if "val/loss" in metrics:
            self.reports += 1
            time.sleep(self.seconds)


def test_throughput_and_mfu_time_training_only() -> None:
    slow = SlowEvaluation(0.25)
    config = config_for(
        "rackwise", steps=6, log_every_steps=2, eval={"batches": 1, "every_steps": 1}
    )
    data = build_data(config.data, config.training)
    rack = create_rack_from_config(config)
    results = ArchitectureTrainer(config, callbacks=[slow]).train_architecture(
        rack, data.train_loader, data.val_loader
    )
    stage = results.stages[0]
    slept = 0.25 * slow.reports
    assert slow.reports >= 5
    # Wall time holds the slow evaluations; training time and the rates derived from it do not.
    assert stage.wall_time_s >= stage.extra["train_time_s"] + slept
    assert stage.tokens_per_s == pytest.approx(stage.tokens / stage.extra["train_time_s"])
    assert results.tokens_per_s == pytest.approx(
        results.total_tokens / results.extra["train_time_s"]
    )
    # Each logged rate covers 2 steps of 128 tokens: with the evaluations counted it could not
    # exceed 256 / 0.25 tokens/s.
    assert min(slow.rates) > 256 / 0.25


def test_fusion_takes_its_share_of_a_flops_budget() -> None:
    budget = 4.0e9
    fusion = {"enabled": True, "flops_fraction": 0.25}
    config = config_for("stackwise", budget={"flops": budget}, fusion=fusion)
    _, states, results = train(config)
    assert [r.stage.name for r in states.results] == ["stack_0", "stack_1", "fusion"]
    d, vocab, tokens = 32, 260, 4 * 32
    block = 2 * (4 * d * d + 3 * d * 88) + 2 * 2 * 32 * d
    full_step = (3 * 4 * block + 3 * 2 * d * vocab) * tokens  # whole rack, untied head trained
    fused = states.results[-1].flops
    assert fused == pytest.approx(states.results[-1].steps * full_step)
    assert 0.25 * budget - full_step < fused <= 0.25 * budget
    assert results.flops <= budget


def test_a_fusion_share_needs_a_flops_budget() -> None:
    with pytest.raises(ValueError, match=r"training.fusion.flops_fraction.*budget.flops"):
        config_for("stackwise", fusion={"enabled": True, "flops_fraction": 0.25})


def test_the_trainer_redraws_favor_features_on_their_cadence() -> None:
    kernel = {"feature_map": "favor", "redraw_every": 2}
    config = config_for("rackwise", steps=5, model={"attention_type": "kernel", "kernel": kernel})
    seen: list[torch.Tensor] = []

    class Projection(TrainingCallback):
        def on_metrics(self, metrics: dict[str, float], step: int) -> None:
            if "train/loss" in metrics:
                seen.append(rack.blocks[0].attn.projection.clone())

    data = build_data(config.data, config.training)
    rack = create_rack_from_config(config)
    initial = rack.blocks[0].attn.projection.clone()
    ArchitectureTrainer(config, callbacks=[Projection()]).train_architecture(
        rack, data.train_loader
    )
    # after steps 1..5: redrawn at steps 2 and 4 only
    changed = [not torch.equal(a, b) for a, b in zip([initial, *seen], seen, strict=False)]
    assert changed == [False, True, False, True, False]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_frozen_pieces_held_in_low_precision_are_re_run_and_restored(precision: str) -> None:
    """Fresh data re-runs the frozen trunk every step: it runs in the lowered form, its fp32
    weights come back bitwise, and the run stays close to the fp32 run."""
    seen: set[tuple[str, torch.dtype]] = set()

    def settings(frozen: str) -> StackWiseConfig:
        return config_for(
            "blockwise", steps=16, frozen_precision=frozen, depthwise={"data": "fresh"}
        )

    _, _, reference = train(settings("fp32"))
    config = settings(precision)
    data = build_data(config.data, config.training)
    rack = create_rack_from_config(config)

    def record(module: torch.nn.Module, args: Any) -> None:
        if not module.training:  # a frozen forward
            seen.add((type(module).__name__, module.weight.dtype))

    rack.blocks[0].attn.qkv_proj.register_forward_pre_hook(record)
    states = StageStates(rack)
    results = ArchitectureTrainer(config, callbacks=[states]).train_architecture(
        rack, data.train_loader, data.val_loader
    )
    lowered = {"bf16": ("Linear", torch.bfloat16), "int8": ("Int8Linear", torch.int8)}
    assert lowered[precision] in seen  # the frozen block ran held as bf16 / int8 …
    # … and is back in fp32, bitwise as its stage left it
    trained = _block_state(rack, states.ends["block_0"], 0)
    final = dict(rack.blocks[0].state_dict())
    assert trained.keys() == final.keys()
    assert all(torch.equal(trained[k], final[k]) for k in trained)
    assert type(rack.blocks[0].attn.qkv_proj.weight).__name__ == "Parameter"
    assert results.final_val_loss == pytest.approx(reference.final_val_loss, rel=2e-3)
