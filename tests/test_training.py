"""The trainer: loss falls in every mode, freezing semantics, budgets, faults, fusion."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from stackwise.config.base import StackWiseConfig
from stackwise.data import build_data
from stackwise.model.architecture import create_rack_from_config
from stackwise.training.architecture_trainer import ArchitectureTrainer, TrainingError
from stackwise.training.callbacks import StageInfo, StageResult, TrainingCallback
from stackwise.training.objectives import build_objective
from stackwise.training.plan import estimate_run, plan_stages

TinyConfig = Callable[..., StackWiseConfig]  # the `tiny_config` fixture (conftest.py)


@pytest.fixture
def tiny_config(tiny_config: TinyConfig) -> TinyConfig:
    """The shared tiny config (conftest.py) logging every step: these tests read each step's
    metrics."""
    return functools.partial(tiny_config, log_every_steps=1)


def run(config: StackWiseConfig, callbacks: list[TrainingCallback] | None = None, **kw: Any):
    data = build_data(config.data, config.training)
    rack = create_rack_from_config(config)
    trainer = ArchitectureTrainer(config, callbacks=callbacks, **kw)
    results = trainer.train_architecture(rack, data.train_loader, data.val_loader)
    return rack, results


def held_out_loss(rack: nn.Module, config: StackWiseConfig, loader: Any) -> float:
    """The objective on the first validation batches (diffusion: at its fixed t nodes)."""
    t = config.training
    objective = build_objective(
        t.objective, vocab_size=260, mask_token_id=257, eval_points=t.eval.diffusion_t_points
    )
    generator = torch.Generator().manual_seed(0)
    losses = []
    rack.eval()
    with torch.no_grad():
        for _, ids in zip(range(2), loader.iter_epoch(0), strict=False):
            for batch in objective.eval_corruptions(ids, generator):
                losses.append(float(objective.loss(rack(batch.inputs), batch)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("objective", ["clm", "mlm", "diffusion"])
@pytest.mark.parametrize("mode", ["rackwise", "stackwise", "blockwise"])
def test_loss_falls(mode: str, objective: str, tiny_config: TinyConfig) -> None:
    config = tiny_config(mode, objective, steps=24)
    data = build_data(config.data, config.training)
    rack = create_rack_from_config(config)
    before = held_out_loss(rack, config, data.val_loader)
    results = ArchitectureTrainer(config).train_architecture(
        rack, data.train_loader, data.val_loader
    )
    after = held_out_loss(rack, config, data.val_loader)
    assert after < before - 0.3, (before, after)
    assert results.final_val_loss is not None and results.final_val_loss < before
    assert results.total_steps == 24
    assert results.flops > 0 and results.tokens_per_s > 0 and results.peak_memory_bytes > 0
    assert (results.next_token_perplexity is not None) == (objective == "clm")
    expected_stages = {"rackwise": ["rack"], "stackwise": ["stack_0", "stack_1"]}
    names = [s.stage.name for s in results.stages]
    assert names == expected_stages.get(mode, ["block_0", "block_1"])


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("tie", "head", "frozen_precision"),
    [
        (True, "frozen", "fp32"),
        (True, "untie", "fp32"),
        (False, "untie", "fp32"),
        (True, "frozen", "bf16"),
    ],
)
def test_frozen_pieces_are_bitwise_unchanged_after_their_stage(
    tie: bool, head: str, frozen_precision: str, tiny_config: TinyConfig
) -> None:
    config = tiny_config(
        "blockwise",
        "mlm",
        steps=9,
        model={"architecture": {"n_stacks": 3, "blocks_per_stack": 1}, "tie_embeddings": tie},
        frozen_precision=frozen_precision,
        depthwise={"head": head},
    )
    rack = create_rack_from_config(config)
    trunk_dtypes: set[torch.dtype] = set()
    rack.blocks[0].register_forward_pre_hook(
        lambda module, args: trunk_dtypes.add(next(module.parameters()).dtype)
    )
    snapshots: dict[str, dict[str, torch.Tensor]] = {}
    heads: list[torch.Tensor] = []

    class Snap(TrainingCallback):
        def on_stage_end(self, result: StageResult, step: int) -> None:
            index = result.stage.index
            snapshots[f"block_{index}"] = _snapshot(rack.blocks[index])
            if index == 0:
                snapshots["embedding"] = _snapshot(rack.token_embedding)
            heads.append(rack.lm_head.weight.detach().clone())

    data = build_data(config.data, config.training)
    initial_embedding = _snapshot(rack.token_embedding)
    ArchitectureTrainer(config, callbacks=[Snap()]).train_architecture(rack, data.train_loader)
    for index in range(3):
        assert _same(snapshots[f"block_{index}"], _snapshot(rack.blocks[index]))
    assert _same(snapshots["embedding"], _snapshot(rack.token_embedding))
    assert not _same(initial_embedding, snapshots["embedding"])  # trained in stage 0
    # bf16: the frozen block ran in bf16 and its fp32 weights came back bitwise
    lowered = {"fp32": torch.float32, "bf16": torch.bfloat16}[frozen_precision]
    assert trunk_dtypes == {torch.float32, lowered}
    if tie and head == "frozen":
        assert torch.equal(heads[0], heads[-1])  # the tied head is the frozen embedding
    else:
        assert not torch.equal(heads[0], heads[-1])  # an untied head trains in every stage


def test_declared_frozen_stack_is_never_trained(
    tiny_config: TinyConfig, recording_callback: type
) -> None:
    config = tiny_config(
        "stackwise",
        "mlm",
        steps=6,
        model={
            "stacks": [{"n_blocks": 1}, {"n_blocks": 1, "freeze_blocks": True}, {"n_blocks": 1}]
        },
    )
    rack = create_rack_from_config(config)
    frozen = _snapshot(rack.stacks[1])
    recorder = recording_callback()
    data = build_data(config.data, config.training)
    results = ArchitectureTrainer(config, [recorder]).train_architecture(rack, data.train_loader)
    assert [s.stage.name for s in results.stages] == ["stack_0", "stack_2"]
    assert _same(frozen, _snapshot(rack.stacks[1]))
    assert all(not p.requires_grad for p in rack.stacks[1].parameters())  # flags restored


def test_a_frozen_first_stack_warns_that_the_embedding_never_trains(
    tiny_config: TinyConfig,
) -> None:
    model = {"stacks": [{"n_blocks": 1, "freeze_blocks": True}, {"n_blocks": 1}]}
    config = tiny_config("stackwise", "mlm", steps=4, model=model)
    rack = create_rack_from_config(config)
    with pytest.warns(UserWarning, match="never trains the token embedding"):
        plans = plan_stages(config, rack)
    assert [p.name for p in plans] == ["stack_1"] and not plans[0].trains_embedding
    rackwise = tiny_config("rackwise", "mlm", steps=4, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # end to end, gradients reach the embedding: no warning
        plan_stages(rackwise, create_rack_from_config(rackwise))


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_backward_stops_at_the_trainable_piece(tiny_config: TinyConfig) -> None:
    config = tiny_config("blockwise", "clm", steps=6, cache={"enabled": False})
    rack = create_rack_from_config(config)
    stage = {"index": 0}
    calls: dict[tuple[int, str], int] = {}

    def hook(name: str):
        def count(module: nn.Module, grad_in: Any, grad_out: Any) -> None:
            key = (stage["index"], name)
            calls[key] = calls.get(key, 0) + 1

        return count

    rack.token_embedding.register_full_backward_hook(hook("embedding"))
    rack.blocks[0].register_full_backward_hook(hook("block_0"))
    rack.blocks[1].register_full_backward_hook(hook("block_1"))
    grads: list[bool] = []

    class Track(TrainingCallback):
        def on_stage_start(self, info: StageInfo, step: int) -> None:
            stage["index"] = info.index
            trainable = {n for n, p in rack.named_parameters() if p.requires_grad}
            grads.append(any(n.startswith("token_embedding") for n in trainable))

    data = build_data(config.data, config.training)
    ArchitectureTrainer(config, [Track()]).train_architecture(rack, data.train_loader)
    assert calls.get((0, "embedding"), 0) > 0 and calls.get((0, "block_0"), 0) > 0
    assert calls.get((1, "block_1"), 0) > 0
    assert calls.get((1, "block_0"), 0) == 0 and calls.get((1, "embedding"), 0) == 0
    assert grads == [True, False]
    assert rack.token_embedding.weight.grad is None


def test_non_finite_loss_names_stage_and_step(tiny_config: TinyConfig) -> None:
    config = tiny_config("blockwise", "clm", steps=4)
    rack = create_rack_from_config(config)
    with torch.no_grad():
        rack.norm.weight.fill_(float("nan"))
    data = build_data(config.data, config.training)
    with pytest.raises(TrainingError, match=r"non-finite loss.*stage block_0.*step 1") as caught:
        ArchitectureTrainer(config).train_architecture(rack, data.train_loader)
    # grad_clip is already set (1.0 by default): the advice must not be to set it
    assert "lower training.optimizer.lr" in str(caught.value)
    assert "grad_clip" not in str(caught.value)
    config.training.optimizer.grad_clip = None
    with pytest.raises(TrainingError, match=r"or set training.optimizer.grad_clip"):
        ArchitectureTrainer(config).train_architecture(rack, data.train_loader)


def test_plain_tensor_and_dict_batches_as_in_the_seed(tiny_config: TinyConfig) -> None:
    config = tiny_config("blockwise", "mlm", steps=4)
    torch.manual_seed(0)
    tensors = [torch.randint(0, 256, (2, 16)) for _ in range(3)]
    rack = create_rack_from_config(config)
    results = ArchitectureTrainer(config).train_architecture(rack, tensors)
    assert results.total_steps == 4 and results.final_val_loss is None
    dicts = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in tensors]
    results = ArchitectureTrainer(config).train_architecture(rack, dicts)
    assert results.total_steps == 4


def test_budget_split_equal_tokens_by_params_and_fractions(tiny_config: TinyConfig) -> None:
    config = tiny_config(
        "blockwise", steps=10, model={"architecture": {"n_stacks": 3, "blocks_per_stack": 1}}
    )
    rack = create_rack_from_config(config)
    assert [p.steps for p in plan_stages(config, rack)] == [4, 3, 3]
    tokens = tiny_config("stackwise", budget={"tokens": 4 * 32 * 8})
    assert [p.steps for p in plan_stages(tokens, create_rack_from_config(tokens))] == [4, 4]
    by_params = tiny_config(
        "blockwise",
        steps=30,
        budget={"steps": 30, "split": "by_params"},
        model={"stacks": [{"n_blocks": 1, "d_ff": 64}, {"n_blocks": 1, "d_ff": 256}]},
    )
    plans = plan_stages(by_params, create_rack_from_config(by_params))
    assert plans[0].steps < plans[1].steps and sum(p.steps for p in plans) == 30
    fractions = tiny_config(
        "blockwise",
        steps=20,
        model={
            "stacks": [
                {"n_blocks": 2, "budget_fraction": 0.5, "lr": 1e-4},
                {"n_blocks": 1},
            ]
        },
    )
    plans = plan_stages(fractions, create_rack_from_config(fractions))
    assert [p.steps for p in plans] == [5, 5, 10]
    assert [p.lr for p in plans] == [1e-4, 1e-4, 3e-3]
    assert [p.trains_embedding for p in plans] == [True, False, False]


def test_layerwise_is_blockwise_and_fusion_adds_a_joint_stage(tiny_config: TinyConfig) -> None:
    config = tiny_config(
        "blockwise", "mlm", steps=4, fusion={"enabled": True, "steps": 3, "lr": 1e-3}
    )
    config.training.training_architecture = "layerwise"  # type: ignore[assignment]
    assert config.training.training_architecture == "blockwise"
    rack = create_rack_from_config(config)
    embedding: list[torch.Tensor] = []

    class Snap(TrainingCallback):
        def on_stage_end(self, result: StageResult, step: int) -> None:
            embedding.append(rack.token_embedding.weight.detach().clone())

    data = build_data(config.data, config.training)
    results = ArchitectureTrainer(config, [Snap()]).train_architecture(
        rack, data.train_loader, data.val_loader
    )
    assert [s.stage.name for s in results.stages] == ["block_0", "block_1", "fusion"]
    assert results.total_steps == 7
    assert torch.equal(embedding[0], embedding[1])  # frozen after stage 0
    assert not torch.equal(embedding[1], embedding[2])  # fusion trains it again


def test_callbacks_order_and_metrics(tiny_config: TinyConfig, recording_callback: type) -> None:
    recorder = recording_callback()
    config = tiny_config("stackwise", "clm", steps=4, eval={"batches": 1, "every_steps": 1})
    run(config, [recorder])
    assert recorder.events == [
        "train_start",
        "stage_start:stack_0",
        "stage_end:stack_0",
        "stage_start:stack_1",
        "stage_end:stack_1",
        "train_end",
    ]
    keys = set().union(*(m.keys() for _, m in recorder.metrics))
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/stage", "val/loss"} <= keys
    assert "final/next_token_perplexity" in keys
    steps = [s for s, m in recorder.metrics if "train/loss" in m]
    assert steps == [1, 2, 3, 4]


def test_estimate_run_matches_the_plan(tiny_config: TinyConfig) -> None:
    config = tiny_config("blockwise", "mlm", steps=10)
    estimate = estimate_run(config)
    rack = create_rack_from_config(config)
    # A depth-wise run unties the head by default: it adds a vocab x d_model weight.
    head = rack.vocab_size * rack.d_model
    assert estimate.total_parameters == rack.get_parameter_count() + head
    assert [s.name for s in estimate.stages] == ["block_0", "block_1"]
    assert [s.steps for s in estimate.stages] == [5, 5]
    assert estimate.stages[0].tokens == 5 * 4 * 32
    assert estimate.flops > 0 and estimate.peak_memory_bytes > 0 and estimate.device == "cpu"
    deep = {"architecture": {"n_stacks": 3, "blocks_per_stack": 1}}
    cached = estimate_run(tiny_config("blockwise", "mlm", steps=10, model=deep))
    uncached = estimate_run(
        tiny_config("blockwise", "mlm", steps=10, model=deep, cache={"enabled": False})
    )
    assert cached.flops < uncached.flops


def test_tuple_batches_carry_their_padding_mask() -> None:
    """(ids, mask) tuples — what a TensorDataset of both yields — keep the mask."""
    from stackwise.training.architecture_trainer import TrainingError, _unpack

    ids = torch.randint(0, 260, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    got_ids, got_mask = _unpack((ids, mask))
    assert torch.equal(got_ids, ids) and got_mask is not None and torch.equal(got_mask, mask)
    assert _unpack((ids,))[1] is None
    with pytest.raises(TrainingError, match="attention mask of 0/1"):
        _unpack((ids, ids + 5))  # e.g. labels: not a mask, so not silently used as one


@pytest.mark.parametrize(
    ("objective", "names"),
    [
        ("clm", {"loss", "perplexity"}),
        ("mlm", {"loss"}),  # masked-token loss: no perplexity of any distribution
        ("diffusion", {"loss", "nelbo", "ppl_bound"}),
    ],
)
def test_validation_metrics_name_what_each_objective_estimates(
    objective: str, names: set[str], tiny_config: TinyConfig, recording_callback: type
) -> None:
    recorder = recording_callback()
    config = tiny_config("rackwise", objective, steps=2, eval={"batches": 1})
    _, results = run(config, [recorder])
    val = [m for _, m in recorder.metrics if "val/loss" in m]
    final = [m for _, m in recorder.metrics if "final/loss" in m]
    assert val and len(final) == 1
    assert set(val[-1]) - {"val/stage"} == {f"val/{name}" for name in names}
    assert set(final[0]) - {"final/next_token_perplexity"} == {f"final/{n}" for n in names}
    assert results.final_val_loss == final[0]["final/loss"]
    if objective == "clm":
        assert results.final_val_perplexity == pytest.approx(math.exp(results.final_val_loss))
    else:
        assert results.final_val_perplexity is None
        assert results.stages[0].val_perplexity is None
        assert "final_val_perplexity" not in results.summary_metrics()
    if objective == "diffusion":
        nelbo = final[0]["final/nelbo"]
        assert nelbo == final[0]["final/loss"]
        assert final[0]["final/ppl_bound"] == pytest.approx(math.exp(nelbo))


def test_deterministic_algorithms_during_training_and_restored_after(
    tiny_config: TinyConfig,
) -> None:
    seen: list[bool] = []

    class Probe(TrainingCallback):
        def on_metrics(self, metrics: dict[str, float], step: int) -> None:
            seen.append(torch.are_deterministic_algorithms_enabled())

    before = torch.are_deterministic_algorithms_enabled()
    run(tiny_config("rackwise", "clm", steps=2, deterministic=True), [Probe()])
    assert seen and all(seen)
    assert torch.are_deterministic_algorithms_enabled() == before
    seen.clear()
    run(tiny_config("rackwise", "clm", steps=2), [Probe()])
    assert seen and not any(seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is switched on only on CUDA")
def test_tf32_flags_are_restored_after_cuda_training(tiny_config: TinyConfig) -> None:
    seen: list[tuple[bool, bool]] = []

    class Probe(TrainingCallback):
        def on_metrics(self, metrics: dict[str, float], step: int) -> None:
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        run(tiny_config("rackwise", "clm", steps=2, device="cuda"), [Probe()])
        assert seen and all(flags == (True, True) for flags in seen)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (
            False,
            False,
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("mode", ["rackwise", "blockwise"])
def test_test_loss_is_the_trained_racks_cross_entropy_over_every_test_batch(
    mode: str, tiny_config: TinyConfig, recording_callback: type
) -> None:
    config = tiny_config(mode, "clm", steps=8)
    data = build_data(config.data, config.training)
    assert data.test_loader is not None
    rack = create_rack_from_config(config)
    recorder = recording_callback()
    results = ArchitectureTrainer(config, callbacks=[recorder]).train_architecture(
        rack, data.train_loader, data.val_loader, data.test_loader
    )
    # Naive reference: next-token cross entropy of the trained rack, batch by batch, averaged
    # over every batch of the test split (the last one may be short).
    rack.eval()
    batch_losses = []
    with torch.no_grad():
        for ids in data.test_loader.sequences.split(config.training.batch_size):
            logits = rack(ids)
            batch_losses.append(
                float(
                    nn.functional.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
                    )
                )
            )
    assert len(batch_losses) > config.training.eval.batches  # more than validation reads
    expected = sum(batch_losses) / len(batch_losses)
    assert results.final_test_loss == pytest.approx(expected, rel=1e-6)
    logged = [m["test/loss"] for _, m in recorder.metrics if "test/loss" in m]
    assert logged == [results.final_test_loss]
    assert "final_test_loss" in results.summary_metrics()
