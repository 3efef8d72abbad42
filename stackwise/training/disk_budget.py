"""The disk budget of a spilled activation cache, by the name the pre-run checks import from
here; it lives with the other pre-run estimates in `stackwise.training.memory` (section *the
disk budget*). Reading this module does not import torch.
"""

from __future__ import annotations

from stackwise.training.memory import pool_disk_problem

__all__ = ["pool_disk_problem"]
