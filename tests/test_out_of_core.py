"""Out-of-core depth-wise training: the same losses as in memory, a rack that is never whole,
exact resume, and memory that does not grow with the weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.data import build_data
from stackwise.model.architecture import create_rack_from_config
from stackwise.model.materialize import block_is_meta, load_sharded_rack
from stackwise.training.architecture_trainer import ArchitectureTrainer
from stackwise.training.callbacks import StageResult, TrainingCallback


def config_for(
    mode: str = "blockwise", out_of_core: bool = True, **training: Any
) -> StackWiseConfig:
    return StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": 32,
                "n_heads": 2,
                "architecture": {"n_stacks": 2, "blocks_per_stack": 2},
                "dropout": 0.1,  # the global RNG stream must not notice blocks being drawn
            },
            "training": {
                "training_architecture": mode,
                "out_of_core": out_of_core,
                "batch_size": 4,
                "seq_len": 32,
                "budget": {"steps": 12},
                "log_every_steps": 1,
                "eval": {"batches": 2},
                **training,
            },
            "data": {"max_tokens": 30_000},
        }
    )


class Losses(TrainingCallback):
    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []
        self.in_memory: list[int] = []  # blocks in memory at each stage end
        self.rack: Any = None

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "train/loss" in metrics:
            self.train.append(metrics["train/loss"])
        if "val/loss" in metrics:
            self.val.append(metrics["val/loss"])

    def on_stage_end(self, result: StageResult, step: int) -> None:
        if self.rack is not None:
            self.in_memory.append(sum(not block_is_meta(b) for b in self.rack.blocks))


def train(config: StackWiseConfig, **kw: Any) -> tuple[Any, Losses, Any]:
    data = build_data(config.data, config.training)
    if config.training.out_of_core:
        with torch.device("meta"):
            rack = create_rack_from_config(config)
    else:
        rack = create_rack_from_config(config)
    losses = Losses()
    losses.rack = rack
    callbacks = [losses, *kw.pop("callbacks", [])]
    results = ArchitectureTrainer(config, callbacks=callbacks, **kw).train_architecture(
        rack, data.train_loader, data.val_loader, data.test_loader
    )
    return rack, losses, results


@pytest.mark.parametrize("mode", ["blockwise", "stackwise"])
def test_out_of_core_gives_the_losses_of_an_in_memory_run(mode: str) -> None:
    reference_rack, reference, reference_results = train(config_for(mode, out_of_core=False))
    rack, losses, results = train(config_for(mode))
    assert losses.train == reference.train
    assert losses.val == reference.val
    # The final evaluation reads the validation cache instead of running the whole rack: the
    # same operations (dropout off: the model config has 0.1) on differently shaped batches, so
    # equal up to float rounding. A trained block left in train mode moves it by ~1e-4.
    assert results.final_val_loss == pytest.approx(reference_results.final_val_loss, rel=1e-6)
    # The test loss runs the saved pieces block by block: the in-memory run's, over every batch.
    assert results.final_test_loss is not None
    assert results.final_test_loss == pytest.approx(reference_results.final_test_loss, rel=1e-6)
    # Never more than the running piece in memory at a stage end (the first stage's piece is
    # put away once the cache has moved past it).
    piece = 1 if mode == "blockwise" else 2
    assert max(losses.in_memory) <= 2 * piece
    assert all(block_is_meta(b) for b in rack.blocks)  # the rack in hand holds no block
    # The written rack is the in-memory run's rack, weight for weight.
    written = load_sharded_rack(results.weights_dir)
    reference_rack.eval()
    ids = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(written(ids), reference_rack(ids))
    # Without checkpoints nothing resumes from the piece files: the temporary folder keeps the
    # written rack alone.
    folder = Path(results.weights_dir).parent
    assert [p.name for p in folder.iterdir()] == ["rack"]
    shutil.rmtree(folder)


def test_out_of_core_resumes_exactly(tmp_path: Path, interrupt_at: type) -> None:
    config = config_for(checkpoint={"every_steps": 2})
    _, reference, reference_results = train(config, checkpoint_dir=tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        train(config, checkpoint_dir=tmp_path / "run", callbacks=[interrupt_at(8)])
    _, resumed, results = train(config, checkpoint_dir=tmp_path / "run")
    assert resumed.train == reference.train[8:]
    assert results.final_val_loss == reference_results.final_val_loss  # both from the cache
    ids = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = load_sharded_rack(results.weights_dir)(ids)
        b = load_sharded_rack(reference_results.weights_dir)(ids)
    assert torch.equal(a, b)
    # With checkpoints the piece files stay: a later resume reads them.
    assert len(list((tmp_path / "run" / "pieces").glob("block-*.safetensors"))) == 4


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"training_architecture": "rackwise"}, "needs the whole rack"),
        ({"depthwise": {"data": "fresh"}}, "re-runs the whole frozen trunk"),
        ({"cache": {"enabled": False}}, "without the activation cache"),
    ],
)
def test_out_of_core_needs_a_cached_depthwise_run(settings: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=f"training.out_of_core: .*{reason}"):
        StackWiseConfig.from_dict(
            {"training": {"training_architecture": "blockwise", "out_of_core": True, **settings}}
        )


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from stackwise.config.base import StackWiseConfig
    from stackwise.data import build_data
    from stackwise.model.architecture import create_rack_from_config
    from stackwise.training.architecture_trainer import ArchitectureTrainer
    from stackwise.training.metrics import current_rss_bytes, peak_rss_bytes, PeakMemory

    config = StackWiseConfig.from_dict(json.loads(sys.argv[1]))
    data = build_data(config.data, config.training)
    with torch.device("meta"):
        rack = create_rack_from_config(config)
    weights = 4 * sum(p.numel() for p in rack.parameters())
    PeakMemory(torch.device("cpu")).reset()
    before = current_rss_bytes()
    results = ArchitectureTrainer(config).train_architecture(rack, data.train_loader, data.val_loader)
    growth = peak_rss_bytes() - before
    print(json.dumps({"weights": weights, "growth": growth, "loss": results.final_val_loss}))
    """
)


def test_out_of_core_trains_a_rack_larger_than_its_memory_growth(tmp_path: Path) -> None:
    settings = {
        "model": {
            "d_model": 384,
            "n_heads": 6,
            "architecture": {"n_stacks": 24, "blocks_per_stack": 1},
        },
        "training": {
            "training_architecture": "blockwise",
            "out_of_core": True,
            "batch_size": 2,
            "seq_len": 32,
            "budget": {"steps": 24},
            "eval": {"batches": 1},
        },
        "data": {"max_tokens": 20_000},
    }
    probe = tmp_path / "probe.py"
    probe.write_text(MEMORY_PROBE, encoding="utf-8")
    scratch = tmp_path / "scratch"  # the run's temporary folder (its written rack) goes here
    scratch.mkdir()
    done = subprocess.run(
        [sys.executable, str(probe), json.dumps(settings)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # 24 blocks of 384 wide: about 170 MB of fp32 weights; one block is about 7 MB.
    assert report["weights"] > 150e6
    assert report["growth"] < report["weights"], report
    assert report["loss"] is not None and report["loss"] < 6.0


def test_a_tracked_out_of_core_run_logs_a_sharded_rack_that_loads(
    tmp_path: Path,
    tiny_training: Callable[..., dict[str, Any]],
    write_experiment: Callable[..., Path],
    run_cli: Callable[..., Any],
    point_runs: Callable[[Any, str], list[Any]],
) -> None:
    from mlflow import MlflowClient

    from stackwise.tracking.models import load_rack
    from stackwise.tracking.store import default_tracking_uri

    training = {**tiny_training(8), "training_architecture": "blockwise", "out_of_core": True}
    path = write_experiment(tmp_path, "ooc", training=training)
    done = run_cli(tmp_path, "run", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    client = MlflowClient(tracking_uri=default_tracking_uri(tmp_path))
    experiment = client.get_experiment_by_name("ooc")
    (run,) = point_runs(client, experiment.experiment_id)
    assert run.info.status == "FINISHED"
    rack = load_rack(run.info.run_id, tracking_uri=default_tracking_uri(tmp_path))
    assert rack.n_blocks == 2 and not rack.tie_embeddings  # the depth-wise head was untied
    ids = torch.randint(0, 260, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = rack(ids)
    assert logits.shape == (1, 12, 260) and bool(torch.isfinite(logits).all())
    # Final validation loss recorded by the run is the loaded rack's own (clm, 2 val batches).
    assert run.data.metrics["final_val_loss"] < 5.6


def test_out_of_core_estimates_no_cache_allowance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of core the caches are on disk whatever their size: the in-memory allowance (which
    builds a second meta rack of the whole depth) is never estimated."""

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("an out-of-core run estimated a cache allowance")

    monkeypatch.setattr("stackwise.training.pool.cache_memory_allowance", refuse)
    _, losses, results = train(config_for(), checkpoint_dir=None)
    assert losses.train and results.weights_dir is not None
    shutil.rmtree(Path(results.weights_dir).parent)


BLOCK_ALLOCATIONS = textwrap.dedent(
    """
    import ctypes, sys, torch
    from stackwise.training.pieces import keep_large_allocations_off_the_heap
    if sys.argv[1] == "out_of_core":
        keep_large_allocations_off_the_heap()
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    mapped = []
    for _ in range(3):  # a block's weights (3 MiB), allocated and freed stage after stage
        before = libc.mallinfo2().hblks
        weights = torch.ones(768 * 1024)
        mapped.append(libc.mallinfo2().hblks - before)
        del weights
    print(*mapped)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_out_of_core_keeps_blocks_off_the_heap() -> None:
    """A block's weights are mapped memory every time, handed back whole when freed: glibc's
    mmap threshold stays at 128 KiB. (By default glibc raises it when the first mapped block is
    freed, later blocks come from the heap, and a deep run fragments it.)"""

    def mapped(mode: str) -> list[int]:
        done = subprocess.run(
            [sys.executable, "-c", BLOCK_ALLOCATIONS, mode],
            capture_output=True,
            text=True,
            check=True,
        )
        return [int(n) for n in done.stdout.split()]

    if mapped("default") != [1, 0, 0]:
        pytest.skip("this C library does not move freed blocks onto its heap")
    assert mapped("out_of_core") == [1, 1, 1]
