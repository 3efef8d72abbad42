"""Planning a run, by the names other modules have always imported from here.

The stages a run trains are planned by `stackwise.training.stages`; what a run needs is
estimated before it runs by `stackwise.training.memory` (`estimate_run`). This module only
gathers their public names: it holds no rule of its own, and nothing in
`stackwise.training` imports it.
"""

from __future__ import annotations

from stackwise.training.memory import RunEstimate, StageEstimate, estimate_run
from stackwise.training.stages import (
    BudgetError,
    StagePlan,
    eligible_parameters,
    plan_stages,
    pool_micro_batches,
    prepare_rack,
    tokens_per_step,
    trainable_parameters,
)

__all__ = [
    "BudgetError",
    "RunEstimate",
    "StageEstimate",
    "StagePlan",
    "eligible_parameters",
    "estimate_run",
    "plan_stages",
    "pool_micro_batches",
    "prepare_rack",
    "tokens_per_step",
    "trainable_parameters",
]
