"""Typed configuration: the run schema (`base`) and experiment files with grids (`experiment`)."""

from stackwise.config.base import (
    ArchitectureConfig,
    DataConfig,
    ModelConfig,
    StackConfig,
    StackWiseConfig,
    TrackingConfig,
    TrainingConfig,
)

__all__ = [
    "ArchitectureConfig",
    "DataConfig",
    "ModelConfig",
    "StackConfig",
    "StackWiseConfig",
    "TrackingConfig",
    "TrainingConfig",
]
