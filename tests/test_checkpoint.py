"""Checkpoints: atomic files, no pickles, exact resume after an interruption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from stackwise.config.base import StackWiseConfig
from stackwise.data import build_data
from stackwise.model.architecture import create_rack_from_config
from stackwise.training.architecture_trainer import ArchitectureTrainer, TrainingError
from stackwise.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)


def config_for(mode: str, objective: str, **training: Any) -> StackWiseConfig:
    return StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": 32,
                "n_heads": 2,
                "architecture": {"n_stacks": 2, "blocks_per_stack": 1},
                "attention_mode": "bidirectional",
                "dropout": 0.1,
            },
            "training": {
                "training_architecture": mode,
                "objective": objective,
                "batch_size": 4,
                "seq_len": 16,
                "budget": {"steps": 10},
                "log_every_steps": 1,
                "eval": {"batches": 1},
                "checkpoint": {"every_steps": 2, "keep_last": 2},
                **training,
            },
            "data": {"max_tokens": 8_000},
        }
    )


def _train(config: StackWiseConfig, directory: Path, callbacks: list[Any]) -> dict[str, Any]:
    data = build_data(config.data, config.training)
    rack = create_rack_from_config(config)
    trainer = ArchitectureTrainer(
        config, callbacks, checkpoint_dir=directory, checkpoint_metadata={"run_id": "abc"}
    )
    trainer.train_architecture(rack, data.train_loader, data.val_loader)
    return rack.state_dict()


@pytest.mark.parametrize(
    ("mode", "objective", "stop"),
    [
        ("blockwise", "diffusion", 7),
        ("rackwise", "mlm", 5),
        ("stackwise", "mlm", 5),
        ("progressive", "mlm", 7),  # in the middle of the second (grown) stage
    ],
)
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(
    tmp_path: Path, mode: str, objective: str, stop: int, interrupt_at: type
) -> None:
    config = config_for(mode, objective, grad_accum_steps=2)
    reference = _train(config, tmp_path / "reference", [])
    with pytest.raises(KeyboardInterrupt):
        _train(config, tmp_path / "run", [interrupt_at(stop)])
    state = load_checkpoint(tmp_path / "run")
    assert state is not None and state.state["global_step"] == stop
    assert state.state["interrupted"] is True
    assert read_checkpoint_metadata(tmp_path / "run") == {"run_id": "abc"}
    resumed = _train(config, tmp_path / "run", [])
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


def test_resume_from_a_stage_end_checkpoint(tmp_path: Path, interrupt_at: type) -> None:
    config = config_for("blockwise", "mlm", checkpoint={"every_steps": None})
    reference = _train(config, tmp_path / "reference", [])
    with pytest.raises(KeyboardInterrupt):
        _train(config, tmp_path / "run", [interrupt_at(5)])  # last step of stage 0
    resumed = _train(config, tmp_path / "run", [])
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


@pytest.mark.parametrize("head", ["untie", "frozen"])
def test_optimizer_state_only_holds_trainable_parameters(head: str) -> None:
    """Per stage, the optimizer holds exactly the parameters the stage trains (by identity)."""
    config = config_for("blockwise", "mlm", depthwise={"head": head}, checkpoint={})
    data = build_data(config.data, config.training)
    rack = create_rack_from_config(config)
    held: list[frozenset[int]] = []  # per optimizer step: ids of the parameters it holds
    graded: list[frozenset[int]] = []  # per optimizer step: ids of the parameters with a gradient

    def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        assert len({id(p) for p in params}) == len(params)  # each parameter once
        held.append(frozenset(id(p) for p in params))
        graded.append(frozenset(id(p) for p in rack.parameters() if p.grad is not None))

    handle = register_optimizer_step_pre_hook(record)
    try:
        ArchitectureTrainer(config).train_architecture(rack, data.train_loader)
    finally:
        handle.remove()

    def ids(*modules: torch.nn.Module) -> set[int]:
        return {id(p) for module in modules for p in module.parameters()}

    # Written out by hand from the rack: what stage 0 (block 0) and stage 1 (block 1) train.
    embedding, norm, lm_head = rack.token_embedding, rack.norm, rack.lm_head
    if head == "untie":  # the head has its own weight, trained by every stage
        assert rack.lm_head.weight is not rack.token_embedding.weight
        expected = [
            ids(embedding, rack.blocks[0], norm, lm_head),
            ids(rack.blocks[1], norm, lm_head),
        ]
    else:  # the head is the embedding: trained in the first stage only
        assert rack.lm_head.weight is rack.token_embedding.weight
        expected = [ids(embedding, rack.blocks[0], norm), ids(rack.blocks[1], norm)]
    assert held == [expected[0]] * 5 + [expected[1]] * 5
    assert all(g <= h for g, h in zip(graded, held, strict=True))  # no frozen gradient


def test_checkpoint_files_are_safe_and_atomic(tmp_path: Path) -> None:
    embedding = torch.nn.Embedding(5, 3)
    weights = {"embed.weight": embedding.weight, "head.weight": embedding.weight}
    for step in range(4):
        save_checkpoint(
            tmp_path,
            name=f"{step:08d}",
            weights=weights,
            optimizer=None,
            scheduler=None,
            rng={"torch": torch.get_rng_state()},
            state={"global_step": step},
            metadata={"run_id": "r1"},
            keep_last=2,
        )
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-"))
    assert names == ["ckpt-00000002", "ckpt-00000003"]
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "ckpt-00000003"
    assert len(load_file(str(latest / "model.safetensors"))) == 1  # the tied tensor is stored once
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and torch.equal(loaded.weights["head.weight"], embedding.weight)
    # A half-written checkpoint (a leftover temporary folder) is ignored.
    (tmp_path / ".tmp-ckpt-broken").mkdir()
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000003"
    assert json.loads((latest / "metadata.json").read_text()) == {"run_id": "r1"}
    assert read_checkpoint_metadata(tmp_path / "empty") is None


def test_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    config = config_for("rackwise", "mlm", budget={"steps": 2})
    _train(config, tmp_path, [])
    other = config_for("rackwise", "mlm", budget={"steps": 3})
    with pytest.raises(TrainingError, match="another config"):
        _train(other, tmp_path, [])


class InterruptingBatches:
    """A fixed list of batches whose `interrupt_at`-th batch taken (1-based) raises Ctrl-C."""

    def __init__(self, batches: list[torch.Tensor], interrupt_at: int) -> None:
        self.batches = batches
        self.interrupt_at = interrupt_at
        self.taken = 0

    def __iter__(self):
        for batch in self.batches:
            self.taken += 1
            if self.taken == self.interrupt_at:
                raise KeyboardInterrupt
            yield batch


def test_interrupt_while_drawing_the_sample_pool_resumes_exactly(tmp_path: Path) -> None:
    """Ctrl-C before the depth-wise sample pool is complete must not shift the data position:
    the resumed run draws the same pool and ends with the same weights."""
    config = config_for("blockwise", "mlm", budget={"steps": 6}, grad_accum_steps=2)
    batches = list(build_data(config.data, config.training).train_loader.iter_epoch(0))

    def train(loader: Any, directory: Path) -> dict[str, torch.Tensor]:
        rack = create_rack_from_config(config)
        ArchitectureTrainer(config, checkpoint_dir=directory).train_architecture(rack, loader)
        return rack.state_dict()

    reference = train(batches, tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        train(InterruptingBatches(batches, interrupt_at=3), tmp_path / "run")  # pool: 6 batches
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.state["global_step"] == 0
    resumed = train(batches, tmp_path / "run")
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


def test_resume_restores_the_loss_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt_at: type
) -> None:
    """The fp16 GradScaler's scale is part of the checkpoint (a CPU scaler stands in for CUDA)."""
    scalers: list[torch.amp.GradScaler] = []
    real_scaler = torch.amp.GradScaler

    def cpu_scaler(device: str = "cuda", enabled: bool = True) -> torch.amp.GradScaler:
        scaler = real_scaler("cpu", init_scale=2.0**4, growth_interval=1, enabled=True)
        scalers.append(scaler)
        return scaler

    monkeypatch.setattr(torch.amp, "GradScaler", cpu_scaler)
    config = config_for("rackwise", "mlm", budget={"steps": 6})
    reference = _train(config, tmp_path / "reference", [])
    with pytest.raises(KeyboardInterrupt):
        _train(config, tmp_path / "run", [interrupt_at(4)])
    resumed = _train(config, tmp_path / "run", [])
    # The scale doubles after every step: 2^4 * 2^6 after six steps, resumed or not.
    assert scalers[0].get_scale() == scalers[-1].get_scale() == 2.0**10
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
