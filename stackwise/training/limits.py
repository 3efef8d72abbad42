"""Limits checked before anything runs, by the names the command line and the pre-run checks
import from here; they live with the other pre-run estimates in `stackwise.training.memory`
(section *limits*). Reading this module does not import torch.
"""

from __future__ import annotations

from stackwise.training.memory import (
    MemoryProblem,
    check_run_memory,
    format_bytes,
    memory_problem,
    memory_upper_bound,
    parameter_count,
)

__all__ = [
    "MemoryProblem",
    "check_run_memory",
    "format_bytes",
    "memory_problem",
    "memory_upper_bound",
    "parameter_count",
]
