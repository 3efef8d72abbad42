"""`stackwise.train`: one config trained from Python (data -> rack -> trainer -> results)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import stackwise
from stackwise.api import build_rack
from stackwise.data import build_data

TinyConfig = Callable[..., Any]  # the `tiny_config` fixture (conftest.py)


def _naive_test_loss(rack: nn.Module, sequences: torch.Tensor, batch_size: int) -> float:
    """Next-token cross entropy of `rack`, batch by batch, averaged over every batch of the test
    sequences (the last batch may be short): written out here, not the trainer's evaluation."""
    rack.eval()
    losses = []
    with torch.no_grad():
        for ids in sequences.split(batch_size):
            logits = rack(ids)
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
            losses.append(float(loss))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("mode", ["rackwise", "stackwise"])
def test_train_returns_the_trained_rack_and_its_test_loss(
    mode: str, tiny_config: TinyConfig
) -> None:
    config = tiny_config(mode, steps=6)
    assert config.model.vocab_size is None
    trained = stackwise.train(config)

    # The data it trained and was tested on is the configured data, built independently here.
    reference = build_data(config.data, config.training)
    assert reference.test_loader is not None and trained.data.test_loader is not None
    assert torch.equal(trained.data.test_loader.sequences, reference.test_loader.sequences)
    # The vocabulary comes from the tokenizer (the byte tokenizer: 256 bytes + 4 specials).
    assert trained.config.model.vocab_size == 260
    assert trained.rack.vocab_size == 260

    results = trained.results
    assert results.training_architecture == mode
    assert results.total_steps == 6
    expected = _naive_test_loss(
        trained.rack, reference.test_loader.sequences, config.training.batch_size
    )
    assert results.final_test_loss == pytest.approx(expected, rel=1e-6)


def test_train_takes_a_yaml_file_a_dict_and_callbacks(
    tmp_path: Path, tiny_config: TinyConfig, recording_callback: type
) -> None:
    config = tiny_config("rackwise", steps=3, log_every_steps=1)
    path = tmp_path / "run.yaml"
    config.to_yaml(path)
    counted = recording_callback()
    from_file = stackwise.train(path, callbacks=[counted])
    from_dict = stackwise.train(config.to_dict())
    assert counted.steps() == [1, 2, 3]
    # the same config three ways is the same run (seeded): the same trained weights
    for name, weight in from_file.rack.state_dict().items():
        assert torch.equal(weight, from_dict.rack.state_dict()[name]), name
    assert from_file.results.final_test_loss == from_dict.results.final_test_loss


def test_train_resumes_from_its_checkpoint_folder(
    tmp_path: Path, tiny_config: TinyConfig, recording_callback: type
) -> None:
    """A finished run's checkpoint folder: training again resumes at its end (no new steps);
    with ``resume=False`` it trains from the start."""
    config = tiny_config("rackwise", steps=4, log_every_steps=1, checkpoint={"every_steps": 2})
    first = stackwise.train(config, checkpoint_dir=tmp_path)
    assert any(tmp_path.iterdir())
    resumed, restarted = recording_callback(), recording_callback()
    again = stackwise.train(config, checkpoint_dir=tmp_path, callbacks=[resumed])
    assert resumed.steps() == []
    assert again.results.total_steps == first.results.total_steps
    stackwise.train(config, checkpoint_dir=tmp_path, callbacks=[restarted], resume=False)
    assert restarted.steps() == [1, 2, 3, 4]
    for name, weight in first.rack.state_dict().items():
        assert torch.equal(weight, again.rack.state_dict()[name]), name


def test_train_on_given_batches_and_a_rack_built_beforehand(
    tiny_config: TinyConfig, recording_callback: type
) -> None:
    """Given batches replace the corpus (no validation or test data); a given rack is the one
    trained, in place. The first logged loss is the untrained rack's cross entropy on the first
    batch, computed here by hand."""
    config = tiny_config("rackwise", steps=2, log_every_steps=1, model={"vocab_size": 50})
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50, (4, 32), generator=generator) for _ in range(2)]
    rack = build_rack(config)
    untrained = {name: weight.clone() for name, weight in rack.state_dict().items()}
    expected = _naive_test_loss(rack, batches[0], batch_size=4)
    rack.train()
    counted = recording_callback()
    trained = stackwise.train(config, batches=batches, rack=rack, callbacks=[counted])
    assert trained.rack is rack and trained.data is None
    assert counted.losses[0] == pytest.approx(expected, rel=1e-5)
    assert trained.results.final_test_loss is None
    assert any(not torch.equal(w, untrained[n]) for n, w in rack.state_dict().items())
    with pytest.raises(ValueError, match="data or batches"):
        stackwise.train(config, batches=batches, data=build_data(config.data, config.training))


def test_importing_stackwise_stays_light() -> None:
    """`stackwise.train` is there without torch: torch is loaded when it trains."""
    code = (
        "import sys, stackwise\n"
        "assert 'torch' not in sys.modules and 'mlflow' not in sys.modules\n"
        "assert 'train' in stackwise.__all__\n"
        "assert callable(stackwise.train) and 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_an_out_of_core_rack_is_built_on_the_meta_device(tiny_config: TinyConfig) -> None:
    config = tiny_config("blockwise", out_of_core=True)
    assert {p.device.type for p in build_rack(config).parameters()} == {"meta"}
    in_memory = tiny_config("blockwise")
    assert {p.device.type for p in build_rack(in_memory).parameters()} == {"cpu"}
