"""The error a training run stops with."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, out of memory, unusable checkpoint or data)."""
