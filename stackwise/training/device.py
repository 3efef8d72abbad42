"""The training device: choosing it (``auto`` means CUDA, then Apple MPS, then CPU) and the
process-wide switches a run sets on it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from stackwise.training.errors import TrainingError


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a config value (`auto`, `cpu`, `cuda`, `cuda:N` or `mps`)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"training.device is {name!r} but CUDA is not available")
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RuntimeError(f"training.device is {name!r} but MPS is not available")
    return device


@contextlib.contextmanager
def training_switches(device: torch.device, deterministic: bool) -> Iterator[None]:
    """TF32 matmuls on CUDA and, with `deterministic`, torch's deterministic algorithms, for
    the enclosed run; the process's own settings are put back however it ends."""
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if deterministic:
            if device.type == "cuda" and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
                raise TrainingError(
                    "training.deterministic on CUDA needs the environment variable "
                    "CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8) set before the process "
                    "starts, as cuBLAS requires for repeatable results"
                )
            torch.use_deterministic_algorithms(True)
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
