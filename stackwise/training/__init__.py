"""Training: stage planning, objectives, the activation cache, checkpoints and the trainer.

`ArchitectureTrainer` is imported lazily so ``import stackwise.training.stages`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ArchitectureTrainer", "TrainingError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from stackwise.training import architecture_trainer

        return getattr(architecture_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
