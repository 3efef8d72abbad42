"""The disk budget of a spilled activation cache, checked before anything runs.

A spilled pool larger than ``cache.max_disk_gb`` (default: half the free
disk where the cache is written) is a mistake in the input (`pool_disk_problem`). The pool
is bounded by the whole step budget first (no stage has more steps than the run); only a
run over that bound, or with a FLOPs budget, is planned exactly (`pool_plan`).

Reading this module does not import torch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stackwise.config.base import StackWiseConfig
from stackwise.training.memory import ELEMENT_BYTES, caches_pool, pool_plan


def cache_directory(config: StackWiseConfig) -> Path:
    """Where a spilled cache of a `stackwise run` is written: ``cache.directory``, else beside
    the checkpoints, which live under the working folder (``./mlruns``)."""
    directory = config.training.cache.directory
    return Path(directory).expanduser() if directory is not None else Path.cwd()


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def disk_budget_bytes(config: StackWiseConfig) -> tuple[int, str]:
    """The disk a spilled pool may use, and how to name that budget in a message."""
    limit = config.training.cache.max_disk_gb
    if limit is not None:
        return int(limit * 1e9), f"training.cache.max_disk_gb: {limit:g}"
    directory = cache_directory(config)
    free = shutil.disk_usage(_existing_parent(directory)).free
    return free // 2, f"half the free disk in {directory} ({free / 1e9:.3g} GB free)"


def pool_rows_bound(config: StackWiseConfig) -> int | None:
    """At most how many sequences the pool holds, from a step or token budget (None: a FLOPs
    budget, which only planning converts to steps)."""
    training = config.training
    budget = training.budget
    if budget.steps is not None:
        steps = budget.steps
    elif budget.tokens is not None:
        per_step = training.batch_size * training.grad_accum_steps * training.seq_len
        steps = max(1, round(budget.tokens / per_step))
    else:
        return None
    return steps * training.grad_accum_steps * training.batch_size


def pool_disk_problem(config: StackWiseConfig) -> str | None:
    """Why the run's sample pool cannot be cached on its disk budget, or None when it can."""
    if not caches_pool(config):
        return None
    training = config.training
    per_row = training.seq_len * config.model.d_model * ELEMENT_BYTES[training.cache.dtype]
    budget, named = disk_budget_bytes(config)
    bound = pool_rows_bound(config)
    if bound is not None and bound * per_row <= budget:
        return None

    rows, size = pool_plan(config)
    if size <= budget:
        return None
    return (
        f"the activation cache of the sample pool needs {size / 1e9:.3g} GB ({rows:,} sequences "
        f"x seq_len {training.seq_len} x d_model {config.model.d_model} x "
        f"{ELEMENT_BYTES[training.cache.dtype]} bytes of cache.dtype {training.cache.dtype}), "
        f"more than the disk budget of {budget / 1e9:.3g} GB ({named}); lower training.budget, "
        f"set training.cache.dtype: bf16 or training.depthwise.data: fresh, or raise "
        f"training.cache.max_disk_gb"
    )
