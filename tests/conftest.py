"""Shared test setup.

Tests run in parallel (pytest-xdist) on small machines: one intra-op thread per worker avoids
oversubscribing the cores, which otherwise makes tiny-model tests many times slower. Subprocesses
(the real CLI) inherit the same limit through OMP_NUM_THREADS.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)


# -- shared fixtures ---------------------------------------------------------------------------

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

CliRunner = Callable[..., "subprocess.CompletedProcess[str]"]


def run_cli(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The installed `stackwise` console script in a real subprocess (no tracking URI from the
    environment: the store is ./mlruns under `cwd` unless the arguments say otherwise)."""
    script = shutil.which("stackwise", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "stackwise"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "COLUMNS": "200"}
    return subprocess.run(
        [*command, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli() -> CliRunner:
    """`cli("run", path, cwd=folder)`: the command line in a subprocess (see `run_cli`)."""
    return run_cli


TinyConfig = Callable[..., Any]


def make_tiny_config(
    mode: str = "blockwise", objective: str = "clm", steps: int = 8, **training: Any
) -> Any:
    """A `StackWiseConfig` that trains in about a second on a CPU: a 2-stack x 1-block rack of
    width 32 on 30k bytes of the builtin corpus; `training` overrides training settings
    (``model=`` overrides model settings)."""
    from stackwise.config.base import StackWiseConfig

    model: dict[str, Any] = {
        "d_model": 32,
        "n_heads": 2,
        "architecture": {"n_stacks": 2, "blocks_per_stack": 1},
        "attention_mode": "causal" if objective == "clm" else "bidirectional",
    }
    model.update(training.pop("model", {}))
    return StackWiseConfig.from_dict(
        {
            "model": model,
            "training": {
                "training_architecture": mode,
                "objective": objective,
                "batch_size": 4,
                "seq_len": 32,
                "budget": {"steps": steps},
                "optimizer": {"lr": 3e-3},
                "schedule": {"warmup_fraction": 0.0},
                "device": "cpu",
                "eval": {"batches": 2},
                **training,
            },
            "data": {"max_tokens": 30_000},
        }
    )


@pytest.fixture
def tiny_config() -> TinyConfig:
    """`tiny_config("stackwise", "mlm", steps=4, **training)`: see `make_tiny_config`."""
    return make_tiny_config
