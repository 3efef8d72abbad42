"""StackWise: depth-wise (layer-wise, stack-wise) versus end-to-end training of transformer LMs.

Models are built as Block -> Stack -> Rack (`stackwise.model`), configured by typed schemas
(`stackwise.config`), trained by `stackwise.training.ArchitectureTrainer` — from Python, one
config at a time, with `stackwise.train` (`stackwise.api`) — and recorded in MLflow
(`stackwise.tracking`). Heavy modules (torch, mlflow) are imported lazily so the CLI starts fast:
`train` and `TrainedRun` are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stackwise._version import __version__

if TYPE_CHECKING:
    from stackwise.api import TrainedRun, train

__all__ = ["TrainedRun", "__version__", "load_rack", "train"]

_FROM_API = frozenset({"TrainedRun", "train"})


def __getattr__(name: str) -> Any:
    """`stackwise.train` and `stackwise.TrainedRun`, imported when first asked for."""
    if name in _FROM_API:
        from stackwise import api

        return getattr(api, name)
    raise AttributeError(f"module 'stackwise' has no attribute {name!r}")


def load_rack(run_id: str, tracking_uri: str | None = None) -> Any:
    """Load the Rack trained by MLflow run `run_id` (see `stackwise.tracking.models`)."""
    from stackwise.tracking.models import load_rack as _load_rack

    return _load_rack(run_id, tracking_uri=tracking_uri)
