"""The trainer's parts, each on its own, without a training run: the batch stream, the run
position (the checkpoint state), the frozen trunk, the sample pool and its caches, evaluation,
stage setup, the memory probe, the process switches and the run's objective.

Every expected value is computed here by hand or by a naive implementation of the same thing.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stackwise.config.base import StackWiseConfig
from stackwise.model.architecture import create_rack_from_config
from stackwise.training.callbacks import StageInfo, StageResult
from stackwise.training.checkpoint import RunCheckpoints
from stackwise.training.device import training_switches
from stackwise.training.distributed import Distributed
from stackwise.training.errors import TrainingError
from stackwise.training.evaluation import Evaluator
from stackwise.training.flops import linear_weight_count
from stackwise.training.metrics import StageMemoryProbe
from stackwise.training.objectives import CausalLM, MaskedLM, training_objective
from stackwise.training.pool import SamplePool
from stackwise.training.position import RunPosition, decode
from stackwise.training.stage_setup import StageForward, StageSetup
from stackwise.training.stages import StagePlan, plan_stages, prepare_rack
from stackwise.training.stream import BatchStream, first_pass, unpack_batch
from stackwise.training.trunk import FrozenTrunk

D, HEADS, VOCAB, BATCH, SEQ = 16, 2, 40, 2, 8
CPU = torch.device("cpu")


def config_for(mode: str = "blockwise", steps: int = 6, **training: Any) -> StackWiseConfig:
    model = {
        "d_model": D,
        "n_heads": HEADS,
        "vocab_size": VOCAB,
        "architecture": {"n_stacks": 3, "blocks_per_stack": 1},
        **training.pop("model", {}),
    }
    return StackWiseConfig.from_dict(
        {
            "model": model,
            "training": {
                "training_architecture": mode,
                "batch_size": BATCH,
                "seq_len": SEQ,
                "budget": {"steps": steps},
                "eval": {"batches": 2},
                "device": "cpu",
                **training,
            },
        }
    )


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 4, (BATCH, SEQ), generator=generator) for _ in range(n)]


def rack_for(config: StackWiseConfig) -> nn.Module:
    torch.manual_seed(0)
    rack = create_rack_from_config(config)
    prepare_rack(config, rack)
    return rack


# --------------------------------------------------------------------------------------------
# the batch stream
# --------------------------------------------------------------------------------------------


def test_a_stream_wraps_around_and_a_resumed_stream_continues_where_it_stood() -> None:
    data = batches(5)
    stream = BatchStream(data)
    read = [stream.next()[0] for _ in range(7)]
    # Seven reads of five batches: the first pass, then two batches of the second.
    assert all(torch.equal(a, data[i]) for a, i in zip(read, [0, 1, 2, 3, 4, 0, 1], strict=True))
    assert stream.position == (1, 2)
    resumed = BatchStream(data, *stream.position)
    for expected in (2, 3, 4, 0):
        assert torch.equal(resumed.next()[0], data[expected])
        assert torch.equal(stream.next()[0], data[expected])
    assert resumed.position == stream.position == (2, 1)


def test_take_counts_the_real_tokens_of_the_first_pass_only() -> None:
    ids = batches(2)
    masks = [torch.ones(BATCH, SEQ, dtype=torch.long) for _ in ids]
    masks[1][0, 5:] = 0  # three padding positions
    dicts = [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, masks, strict=True)]
    stream = BatchStream(dicts)
    counts = [stream.take()[2] for _ in range(4)]
    assert counts == [BATCH * SEQ, BATCH * SEQ - 3, 0, 0]


def test_a_loader_with_iter_epoch_is_restarted_where_the_stream_stands() -> None:
    class Epochs:
        def __init__(self) -> None:
            self.calls: list[tuple[int, int]] = []

        def iter_epoch(self, epoch: int, start: int = 0) -> Any:
            self.calls.append((epoch, start))
            return iter(batches(4, seed=epoch)[start:])

    loader = Epochs()
    stream = BatchStream(loader, 2, 3)
    assert torch.equal(stream.next()[0], batches(4, seed=2)[3])
    assert torch.equal(stream.next()[0], batches(4, seed=3)[0])  # the next pass
    assert loader.calls == [(2, 3), (3, 0)]
    assert next(first_pass(loader)).shape == (BATCH, SEQ) and loader.calls[-1] == (0, 0)


def test_an_empty_loader_and_unusable_batches_are_training_errors() -> None:
    with pytest.raises(TrainingError, match="yields no batches"):
        BatchStream([]).next()
    ids = batches(1)[0]
    with pytest.raises(TrainingError, match="input_ids must be"):
        unpack_batch(ids[0])
    with pytest.raises(TrainingError, match="'input_ids' entry"):
        unpack_batch({"ids": ids})
    mask = torch.ones_like(ids)
    assert unpack_batch({"input_ids": ids.int(), "attention_mask": mask})[0].dtype == torch.long


# --------------------------------------------------------------------------------------------
# the run position is the checkpoint state
# --------------------------------------------------------------------------------------------


def stage_result(name: str, val_loss: float | None) -> StageResult:
    info = StageInfo(0, name, "block", (0, 1), 5, 1234, 3)
    extra = {"lr": 0.001, "training_memory_bytes": 1000.0}
    return StageResult(info, 5, 640, 2.5, val_loss, None, 1.25, 512.0, 4096, 1e9, None, extra)


def test_a_position_survives_a_checkpoint_field_by_field() -> None:
    position = RunPosition(
        config_hash="abc",
        plan=[("block_0", 5), ("block_1", 4)],
        stage_index=1,
        step_in_stage=2,
        global_step=7,
        stream=(1, 3),
        pool_start=(0, 0),
        total_tokens=640,
        total_flops=1.5e9,
        unique_tokens=320,
        wall_time_s=12.5,
        meter={"tokens": 128.0, "flops": 3.0e8},
        last_logged_loss=2.75,
        loss_window=[2.5, 2.25],
        stage_results=[stage_result("block_0", 2.4), stage_result("block_1", None)],
        interrupted=True,
        grad_scaler={"scale": 16.0, "_growth_tracker": 3},
    )
    state = json.loads(json.dumps(position.to_state()))  # through the file format
    assert RunPosition.from_state(state) == position
    restored = RunPosition.from_state(state).stage_results[0].stage
    assert restored.trainable_blocks == (0, 1)  # a tuple again, as StageInfo declares


def test_a_state_as_checkpoints_have_always_written_it() -> None:
    """The state.json a checkpoint holds, written out by hand in its historical layout: it
    reads into the position, and the position writes it back unchanged."""
    state = {
        "config_hash": "0123abcd",
        "plan": [["block_0", 5], ["block_1", 5]],
        "stage_index": 0,
        "step_in_stage": 3,
        "global_step": 3,
        "stream": [0, 6],
        "pool_start": None,
        "total_tokens": 0,
        "total_flops": 0.0,
        "unique_tokens": 192,
        "wall_time_s": 0.5,
        "meter": {
            "tokens": 192,
            "flops": 1.0e7,
            "train_seconds": 0.25,
            "wall_before": 0.5,
            "peak_bytes": 4096,
        },
        "last_logged_loss": float("nan"),
        "loss_window": [5.5],
        "stage_results": [],
        "interrupted": False,
        "grad_scaler": {},
    }
    position = RunPosition.from_state(state)
    assert (position.stage_index, position.step_in_stage, position.stream) == (0, 3, (0, 6))
    assert position.plan == [("block_0", 5), ("block_1", 5)]
    assert math.isnan(position.last_logged_loss)
    written = position.to_state()
    assert written.keys() == state.keys()
    assert json.dumps(written, sort_keys=True) == json.dumps(state, sort_keys=True)
    older = {k: v for k, v in state.items() if k != "grad_scaler"}  # before the loss scale
    assert RunPosition.from_state(older).grad_scaler == {}


def test_decoding_checks_the_shapes_it_reads() -> None:
    assert decode(tuple[int, int], [1, 2]) == (1, 2)
    assert decode(dict[str, float], {"a": 1}) == {"a": 1.0}
    assert decode(int | None, None) is None
    with pytest.raises(ValueError, match="expected 2 values"):
        decode(tuple[int, int], [1, 2, 3])


# --------------------------------------------------------------------------------------------
# the frozen trunk
# --------------------------------------------------------------------------------------------


def test_the_trunk_output_is_the_racks_own_forward_without_gradients() -> None:
    config = config_for()
    rack = rack_for(config).eval()
    trunk = FrozenTrunk(rack, CPU)
    batch = CausalLM().corrupt(batches(1)[0])
    out = trunk.output(batch, 2)
    with torch.no_grad():
        naive = rack.forward_blocks(rack.embed(batch.inputs), 0, 2)
    assert torch.equal(out, naive) and not out.requires_grad
    h = naive.clone()
    with torch.no_grad():
        assert torch.equal(trunk.run(h, 2, 3, None), rack.blocks[2](h))


def test_a_trunk_held_in_bf16_runs_in_bf16_and_gives_its_fp32_weights_back() -> None:
    rack = rack_for(config_for()).eval()
    original = copy.deepcopy(rack.blocks[0]).eval()
    trunk = FrozenTrunk(rack, CPU, precision="bf16")
    trunk.freeze_below(2)
    assert all(p.dtype == torch.bfloat16 for p in rack.blocks[0].parameters())
    assert all(p.dtype == torch.float32 for p in rack.blocks[2].parameters())
    # The checkpoint's weights and the weights a copied piece starts from stay fp32, exact.
    weights = trunk.weights()
    for key, value in original.state_dict().items():
        assert torch.equal(weights[f"stacks.0.blocks.0.{key}"], value)
        assert torch.equal(trunk.state_of(0)[key], value)
    # The lowered block runs on bf16 inputs and hands back fp32.
    h = torch.randn(BATCH, SEQ, D)
    lowered = copy.deepcopy(original).to(torch.bfloat16)
    with torch.no_grad():
        naive = lowered(h.to(torch.bfloat16), None).float()
    out = trunk.run(h, 0, 1, None)
    assert out.dtype == torch.float32 and torch.equal(out, naive)
    trunk.restore()
    assert trunk.lowered == {}
    for key, value in original.state_dict().items():
        assert torch.equal(rack.blocks[0].state_dict()[key], value)
    trunk.offload_below(2)  # on the CPU there is nowhere to offload to
    assert trunk.offloaded == set()


# --------------------------------------------------------------------------------------------
# the sample pool and its caches
# --------------------------------------------------------------------------------------------


def pool_for(
    config: StackWiseConfig, data: list[torch.Tensor], directory: Path | None = None
) -> tuple[SamplePool, nn.Module, list[StagePlan]]:
    rack = rack_for(config).eval()
    plans = plan_stages(config, rack)
    objective = training_objective(config.training, VOCAB)
    trunk = FrozenTrunk(rack, CPU)
    pool = SamplePool(
        config, plans, data, objective, trunk, Distributed.current(), directory=directory
    )
    return pool, rack, plans


def test_a_trunk_held_in_int8_runs_rows_rounded_to_int8_and_gives_its_fp32_weights_back() -> None:
    rack = rack_for(config_for()).eval()
    original = copy.deepcopy(rack.blocks[0]).eval()
    keys = set(rack.state_dict())
    trunk = FrozenTrunk(rack, CPU, precision="int8")
    trunk.freeze_below(2)
    linears = {n: m for n, m in rack.blocks[0].named_modules() if isinstance(m, nn.Linear)}
    assert linears and all(m.weight.dtype == torch.int8 for m in linears.values())
    assert all(p.dtype == torch.float32 for p in rack.blocks[2].parameters())
    # Counted as the same matmul weights while held in int8.
    assert linear_weight_count(rack.blocks[0]) == linear_weight_count(original)
    # The checkpoint's weights: the same keys, fp32 and exact.
    weights = trunk.weights()
    assert set(weights) == keys
    for key, value in original.state_dict().items():
        assert torch.equal(weights[f"stacks.0.blocks.0.{key}"], value)
    # The block runs on weights rounded per output row to 127 steps of max|row| / 127, each
    # within half a step of the fp32 weight.
    rounded = copy.deepcopy(original)
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                step = w.abs().max(dim=1, keepdim=True).values / 127
                module.weight.copy_(torch.round(w / step) * step)
                assert (module.weight - w).abs().le(step / 2 + 1e-9).all()
                assert len(torch.unique(torch.round(module.weight / step))) <= 255
    h = torch.randn(BATCH, SEQ, D)
    with torch.no_grad():
        naive = rounded(h, None)
        exact = original(h, None)
    out = trunk.run(h, 0, 1, None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, exact, rtol=1e-5, atol=1e-5)  # it did run rounded weights
    trunk.restore()
    assert trunk.lowered == {}
    assert all(type(m) is nn.Linear for m in rack.blocks[0].modules() if isinstance(m, nn.Linear))
    for key, value in original.state_dict().items():
        assert torch.equal(rack.blocks[0].state_dict()[key], value)
    assert set(rack.state_dict()) == keys


def test_the_pool_is_drawn_once_and_the_stream_continues_after_it() -> None:
    config = config_for(steps=6, grad_accum_steps=2)  # 3 stages x 2 steps x 2 micro-batches
    data = batches(10)
    pool, _, _ = pool_for(config, data)
    stream, unique = pool.draw((0, 3))
    assert pool.batches is not None and len(pool.batches) == 4
    assert all(torch.equal(b.inputs, data[3 + i]) for i, b in enumerate(pool.batches))  # clm
    assert stream.position == (0, 7)
    assert unique == 4 * BATCH * SEQ


def test_the_cache_holds_the_trunk_output_and_counts_its_extensions_by_hand(
    tmp_path: Path,
) -> None:
    config = config_for(steps=6, cache={"location": "disk"})
    data = batches(6)
    pool, rack, plans = pool_for(config, data, directory=tmp_path)
    pool.draw((0, 0))
    eval_entries = [CausalLM().corrupt(ids) for ids in batches(2, seed=1)]
    flops: list[float] = []
    assert not pool.caching(plans[0])  # the first stage starts at the embedding
    pool.prepare(plans[0], eval_entries, flops.append)
    assert pool.cache is None and flops == []
    pool.prepare(plans[2], eval_entries, flops.append)  # filled through block 0, then block 1
    assert pool.cache is not None and pool.val_cache is not None
    assert pool.prefix_end == pool.val_cache.prefix_end == 2
    # One block's forward per token, by hand: qkv 16 -> 48, out 16 -> 16, SwiGLU 16 -> 48 (8/3 x
    # 16 rounded up to a multiple of 8) -> 16, QK^T and AV over 8 positions.
    block = 2 * (16 * 48 + 16 * 16 + 3 * 16 * 48) + 2 * 2 * SEQ * 16
    pool_tokens = 2 * BATCH * SEQ  # 2 micro-batches (the longest stage's 2 steps)
    assert flops == [block * pool_tokens, block * pool_tokens]
    for index in range(2):
        _, hidden = pool.read(plans[2], index)
        with torch.no_grad():
            naive = rack.forward_blocks(rack.embed(data[index]), 0, 2)
        assert hidden is not None and torch.allclose(hidden, naive, atol=1e-6)
    assert pool.read(plans[1], 0)[1] is None  # the cache is past block 1's trunk
    assert pool.memory_bytes()[1] == (2 + 2) * BATCH * SEQ * D * 4  # both caches on disk
    assert any(tmp_path.iterdir())
    pool.close()
    pool.close()  # closing twice is harmless
    assert pool.cache is None and pool.val_cache is None
    assert list(tmp_path.iterdir()) == []  # the memory-mapped files are gone


def test_sequences_of_different_lengths_turn_the_cache_off() -> None:
    config = config_for(steps=6)
    pool, _, plans = pool_for(config, batches(6))
    pool.draw((0, 0))
    short = [CausalLM().corrupt(torch.zeros(BATCH, SEQ - 2, dtype=torch.long))]
    with pytest.warns(UserWarning, match="different lengths"):
        pool.prepare(plans[1], short, lambda flops: None)
    assert pool.cache is None and not pool.caching(plans[1])


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def naive_clm_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))


def test_evaluation_cadence() -> None:
    evaluator = Evaluator(nn.Linear(1, 1), CausalLM(), None, config_for().training.eval, 0)  # type: ignore[arg-type]
    evaluator.settings = evaluator.settings.model_copy(update={"every_steps": 3})
    assert [s for s in range(1, 10) if evaluator.should_evaluate(s)] == [3, 6, 9]
    evaluator.settings = evaluator.settings.model_copy(update={"every_steps": None})
    assert not any(evaluator.should_evaluate(s) for s in range(1, 10))


def test_validation_and_test_losses_are_the_racks_own_cross_entropy() -> None:
    config = config_for()
    rack = rack_for(config)
    rack.train()
    val, test = batches(3, seed=1), batches(3, seed=2)
    trunk = FrozenTrunk(rack, CPU)
    evaluator = Evaluator(rack, CausalLM(), trunk, config.training.eval, 0, val, test)
    evaluator.build()
    assert len(evaluator.entries) == 2  # eval.batches of the three
    rack.eval()
    with torch.no_grad():
        val_losses = [naive_clm_loss(rack(ids), ids) for ids in val[:2]]
        test_losses = [naive_clm_loss(rack(ids), ids) for ids in test]
    rack.train()
    metrics = evaluator.whole_rack()
    assert metrics["val/loss"] == pytest.approx(sum(val_losses) / 2, rel=1e-6)
    assert rack.training  # the rack's modes are put back
    assert evaluator.next_token_perplexity() == pytest.approx(
        math.exp(sum(val_losses) / 2), rel=1e-6
    )
    assert evaluator.test(whole_rack=True)["test/loss"] == pytest.approx(
        sum(test_losses) / 3, rel=1e-6
    )
    # A depth-wise stage: its forward on the trunk's output, as the stage trains it.
    plan = plan_stages(config, rack)[1]
    forward = StageForward(rack, plan.start, plan.end)
    stage = evaluator.stage(plan, forward)
    rack.eval()
    with torch.no_grad():
        stage_losses = [
            naive_clm_loss(rack.readout(rack.forward_blocks(rack.embed(ids), 0, 2)), ids)
            for ids in val[:2]
        ]
    assert stage["val/loss"] == pytest.approx(sum(stage_losses) / 2, rel=1e-6)


# --------------------------------------------------------------------------------------------
# stage setup
# --------------------------------------------------------------------------------------------


def ids_of(*modules: nn.Module) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def test_a_depthwise_stage_trains_its_piece_and_the_readout_only() -> None:
    config = config_for()
    rack = rack_for(config)  # depth-wise: the head is untied
    plans = plan_stages(config, rack)
    setup = StageSetup(rack, plans, config.training)
    params = setup.trainable(plans[1])
    expected = ids_of(rack.blocks[1], rack.norm, rack.lm_head)
    assert {id(p) for p in params} == expected and len(params) == len(expected)
    assert {id(p) for p in rack.parameters() if p.requires_grad} == expected
    assert rack.blocks[1].training and rack.lm_head.training
    assert not rack.blocks[0].training and not rack.token_embedding.training
    first = setup.trainable(plans[0])
    assert {id(p) for p in first} == ids_of(
        rack.token_embedding, rack.blocks[0], rack.norm, rack.lm_head
    )
    rack.train(False)
    setup.release()
    assert all(p.requires_grad for p in rack.parameters()) and rack.training


def test_a_rackwise_stage_trains_all_but_a_stack_declared_frozen() -> None:
    stacks = [{"n_blocks": 1}, {"n_blocks": 1, "freeze_blocks": True}, {"n_blocks": 1}]
    config = config_for("rackwise", steps=2, model={"stacks": stacks})
    rack = rack_for(config)
    setup = StageSetup(rack, plan_stages(config, rack), config.training)
    params = setup.trainable(plan_stages(config, rack)[0])
    assert {id(p) for p in params} == ids_of(rack) - ids_of(rack.stacks[1])
    assert rack.training and not rack.stacks[1].training


def test_a_stage_starts_as_copies_where_the_config_says_so() -> None:
    config = config_for(depthwise={"init": "copy_previous", "head": "fresh"})
    rack = rack_for(config)
    plans = plan_stages(config, rack)
    setup = StageSetup(rack, plans, config.training)
    given = {k: torch.full_like(v, 0.5) for k, v in rack.blocks[0].state_dict().items()}
    asked: list[int] = []

    def weights_of(index: int) -> dict[str, torch.Tensor]:
        asked.append(index)
        return given

    setup.initialise(plans[1], weights_of)
    assert asked == [0]
    assert all(torch.equal(v, given[k]) for k, v in rack.blocks[1].state_dict().items())
    assert torch.equal(rack.lm_head.weight, rack.token_embedding.weight)  # a fresh head
    assert rack.lm_head.weight is not rack.token_embedding.weight


def test_doubling_copies_the_trained_trunk_on_top_of_itself() -> None:
    config = config_for(
        "progressive",
        steps=3,
        model={"architecture": {"n_stacks": 4, "blocks_per_stack": 1}},
        growth={"schedule": "doubling"},
    )
    rack = rack_for(config)
    plans = plan_stages(config, rack)
    assert [(p.start, p.end) for p in plans] == [(0, 1), (0, 2), (0, 4)]
    setup = StageSetup(rack, plans, config.training)
    before = [copy.deepcopy(s.state_dict()) for s in rack.stacks]
    setup.initialise(plans[2], lambda index: {})
    after = [s.state_dict() for s in rack.stacks]
    for target, source in ((2, 0), (3, 1), (0, 0), (1, 1)):
        assert all(torch.equal(after[target][k], before[source][k]) for k in before[source])


# --------------------------------------------------------------------------------------------
# the memory probe, the process switches, the objective
# --------------------------------------------------------------------------------------------


def test_the_memory_probe_measures_the_first_step_once_by_hand() -> None:
    model = nn.Linear(4, 3, bias=False)
    optimizer = torch.optim.AdamW(model.parameters())
    probe = StageMemoryProbe(model, CPU)
    x = torch.randn(5, 4)
    with probe.saving(0):
        loss = (model(x) ** 2).sum()  # mm saves x (80 bytes); pow saves its input (60 bytes)
    loss.backward()
    optimizer.step()
    probe.measure(list(model.parameters()), optimizer)
    memory = probe.memory
    assert memory is not None
    assert memory.activations_bytes == 5 * 4 * 4 + 5 * 3 * 4
    assert memory.weights_bytes == memory.gradients_bytes == 12 * 4
    assert memory.optimizer_bytes == 2 * 12 * 4 + 4  # two moments and a float32 step count
    assert isinstance(probe.saving(0), type(probe.saving(1)))  # measured: nothing counts again
    disabled = StageMemoryProbe(model, CPU, enabled=False)
    with disabled.saving(0):
        (model(x) ** 2).sum()
    disabled.measure(list(model.parameters()), optimizer)
    assert disabled.memory is None


def test_training_switches_are_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.are_deterministic_algorithms_enabled()
    with training_switches(CPU, deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cuda = training_switches(torch.device("cuda"), deterministic=True)
    with pytest.raises(TrainingError, match="CUBLAS_WORKSPACE_CONFIG"):
        cuda.__enter__()  # refused on entry, before any switch is changed
    assert torch.are_deterministic_algorithms_enabled() == before


@pytest.mark.parametrize(("vocab", "given", "mask"), [(260, None, 257), (40, None, 39), (40, 7, 7)])
def test_the_mask_token_of_a_runs_objective(vocab: int, given: int | None, mask: int) -> None:
    training = config_for(objective="mlm").training
    objective = training_objective(training, vocab, given)
    assert isinstance(objective, MaskedLM) and objective.mask_token_id == mask
    assert mask not in objective.replacement_ids.tolist()


def test_a_runs_results_add_up_its_stages() -> None:
    first, second = stage_result("block_0", 2.4), stage_result("block_1", 2.2)
    first.extra.update(train_time_s=2.0, cache_memory_bytes=50.0)
    second.extra.update(train_time_s=3.0, training_memory_bytes=3000.0)
    position = RunPosition(
        config_hash="abc",
        plan=[("block_0", 5), ("block_1", 5)],
        global_step=10,
        total_tokens=1000,
        total_flops=5e9,
        unique_tokens=400,
        stage_results=[first, second],
    )
    results = position.results(
        training_architecture="blockwise",
        objective="clm",
        planned_stages=2,
        final={"val/loss": 2.0, "val/perplexity": math.exp(2.0)},
        next_token_perplexity=7.0,
        test={"test/loss": 2.1},
        wall_time_s=9.0,
        peak_memory_bytes=4096,
        peak_flops=1e9,
        device="cpu",
        weights_dir=None,
    )
    assert results.tokens_per_s == pytest.approx(1000 / 5.0)  # training seconds: 2 + 3
    assert results.mfu == pytest.approx(5e9 / 5.0 / 1e9)
    assert (results.total_steps, results.flops, results.final_test_loss) == (10, 5e9, 2.1)
    assert results.final_train_loss == second.train_loss
    assert results.extra == {
        "training_memory_bytes": 3000.0,  # the largest stage's
        "cache_memory_bytes": 50.0,
        "stages": 2.0,
        "tokens_seen": 1000.0,
        "unique_tokens": 400.0,
        "train_time_s": 5.0,
    }


# --------------------------------------------------------------------------------------------
# a run's checkpoints
# --------------------------------------------------------------------------------------------


def test_checkpoints_are_due_on_the_step_cadence_or_after_the_minutes() -> None:
    settings = config_for().training.checkpoint
    steps = RunCheckpoints("unused", settings.model_copy(update={"every_steps": 4}), {})
    steps.settings = steps.settings.model_copy(update={"every_minutes": None})
    assert [s for s in range(1, 13) if steps.due(s)] == [4, 8, 12]
    timed = RunCheckpoints("unused", settings.model_copy(update={"every_minutes": 1e-5}), {})
    timed.start()
    assert not timed.due(1)  # 0.6 ms have not passed yet
    time.sleep(0.002)
    assert timed.due(1)
    timed.taken()
    assert not timed.due(2)


def test_a_checkpoint_is_read_back_for_its_own_run_only(tmp_path: Path) -> None:
    settings = config_for().training.checkpoint
    checkpoints = RunCheckpoints(tmp_path, settings, {"run_id": "r1"})
    position = RunPosition(
        config_hash="abc",
        plan=[("block_0", 3)],
        step_in_stage=2,
        global_step=2,
        stream=(0, 2),
        last_logged_loss=3.5,  # (the default, NaN, equals nothing)
    )
    weights = {"w": torch.arange(4.0)}
    path = checkpoints.write(position, weights=weights, optimizer=None, scheduler=None, rng={})
    assert path.name == "ckpt-00000002-000-000002"
    read = checkpoints.read(position)
    assert read is not None
    assert read[0] == position and torch.equal(read[1].weights["w"], weights["w"])
    assert read[1].metadata == {"run_id": "r1"}
    with pytest.raises(TrainingError, match="belongs to another config"):
        checkpoints.read(replace(position, config_hash="xyz"))
    with pytest.raises(TrainingError, match="different stage plan"):
        checkpoints.read(replace(position, plan=[("block_0", 4)]))
    assert RunCheckpoints(tmp_path / "none", settings, {}).read(position) is None


def test_the_optimizer_is_adamw_fused_on_the_cpu_decaying_matrices_only() -> None:
    """Two steps of `build_optimizer` against AdamW written out here (decoupled decay on the
    matrix, none on the vector)."""
    from stackwise.config.base import OptimizerConfig
    from stackwise.training.optim import build_optimizer

    generator = torch.Generator().manual_seed(0)
    matrix = nn.Parameter(torch.randn(8, 4, generator=generator))
    vector = nn.Parameter(torch.randn(4, generator=generator))
    config = OptimizerConfig(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    optimizer = build_optimizer([matrix, vector], config, 0.01, torch.device("cpu"))
    assert all(group["fused"] for group in optimizer.param_groups)
    expected = {"matrix": matrix.detach().clone(), "vector": vector.detach().clone()}
    moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in expected.items()}
    for step in (1, 2):
        grads = {name: torch.randn(p.shape, generator=generator) for name, p in expected.items()}
        matrix.grad, vector.grad = grads["matrix"].clone(), grads["vector"].clone()
        optimizer.step()
        for name, value in expected.items():
            first, second = moments[name]
            first.mul_(0.9).add_(0.1 * grads[name])
            second.mul_(0.95).add_(0.05 * grads[name] ** 2)
            decay = 0.1 if name == "matrix" else 0.0
            value.mul_(1 - 0.01 * decay)
            update = (first / (1 - 0.9**step)) / ((second / (1 - 0.95**step)).sqrt() + 1e-8)
            value.sub_(0.01 * update)
    assert torch.allclose(matrix.detach(), expected["matrix"], atol=1e-6)
    assert torch.allclose(vector.detach(), expected["vector"], atol=1e-6)
