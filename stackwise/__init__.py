"""StackWise: depth-wise (layer-wise, stack-wise) versus end-to-end training of transformer LMs.

Models are built as Block -> Stack -> Rack (`stackwise.model`), configured by typed schemas
(`stackwise.config`), trained by `stackwise.training.ArchitectureTrainer`, and recorded in MLflow
(`stackwise.tracking`). Heavy modules (torch, mlflow) are imported lazily so the CLI starts fast.
"""

from __future__ import annotations

from typing import Any

from stackwise._version import __version__

__all__ = ["__version__", "load_rack"]


def load_rack(run_id: str, tracking_uri: str | None = None) -> Any:
    """Load the Rack trained by MLflow run `run_id` (see `stackwise.tracking.models`)."""
    from stackwise.tracking.models import load_rack as _load_rack

    return _load_rack(run_id, tracking_uri=tracking_uri)
