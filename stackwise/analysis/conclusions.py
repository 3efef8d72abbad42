"""Conclusions: fixed rules that turn an estimate and its interval into one sentence.

Method (lower loss is better; intervals at `level`, 95 % by default):

1. A loss gap mode − reference whose interval covers zero reads "no measurable difference";
   an interval entirely below zero reads "better by", entirely above zero "worse by"; without
   an interval (one seed) there is no conclusion.
2. A compute multiplier (compute the mode needs for the reference's loss, over the reference's
   compute) whose interval covers 1 reads "no measurable compute difference"; entirely above 1
   "needs more compute", entirely below 1 "needs less compute"; no interval: no conclusion; no
   multiplier (the mode's fitted curve never reaches that loss) says exactly that.
3. Runs over the epoch limit are counted, never interpreted.

Each sentence states its numbers, so it can be checked against the tables it comes from.
"""

from __future__ import annotations

import math

__all__ = ["describe_epochs", "describe_gap", "describe_multiplier"]


def _ci(level: float) -> str:
    return f"{level * 100:g} % CI"


def describe_gap(
    mode: str,
    reference: str,
    mean: float,
    low: float,
    high: float,
    budget: float,
    level: float = 0.95,
) -> str:
    """One sentence on the loss gap `mode` − `reference` (nats) at `budget` FLOPs."""
    if math.isnan(low) or math.isnan(high):
        return (
            f"{mode} vs {reference} at {budget:.2g} FLOPs: one seed, no interval "
            f"({mean:+.3f} nats); no conclusion"
        )
    numbers = f"({mean:+.3f} nats, {_ci(level)} {low:+.3f} to {high:+.3f})"
    if high < 0:
        return (
            f"{mode} is better than {reference} by {-mean:.3f} nats at {budget:.2g} FLOPs {numbers}"
        )
    if low > 0:
        return (
            f"{mode} is worse than {reference} by {mean:.3f} nats at {budget:.2g} FLOPs {numbers}"
        )
    return (
        f"no measurable difference between {mode} and {reference} at {budget:.2g} FLOPs {numbers}"
    )


def describe_multiplier(
    mode: str,
    reference: str,
    value: float | None,
    low: float,
    high: float,
    budget: float,
    level: float = 0.95,
) -> str:
    """One sentence on the compute multiplier of `mode` against `reference` at `budget`."""
    where = f"the fitted {reference} loss at {budget:.2g} FLOPs"
    if value is None:
        return f"{mode} vs {reference}: no compute multiplier, the fitted {mode} curve never reaches {where}"
    if math.isnan(low) or math.isnan(high):
        return (
            f"{mode} vs {reference}: compute multiplier {value:.2f}× for {where}, no interval; "
            "no conclusion"
        )
    numbers = f"(multiplier {value:.2f}×, {_ci(level)} {low:.2f}× to {high:.2f}×)"
    if low > 1:
        return f"{mode} needs {value:.2f}× the compute of {reference} to reach {where} {numbers}"
    if high < 1:
        return (
            f"{mode} needs only {value:.2f}× the compute of {reference} to reach {where} {numbers}"
        )
    return f"no measurable compute difference between {mode} and {reference} for {where} {numbers}"


def describe_epochs(count: int, total: int, limit: float, largest: float) -> str:
    """One sentence counting the runs above the epoch limit."""
    return (
        f"{count} of {total} runs passed over the training data more than {limit:g} times "
        f"(at most {largest:.2f} epochs); see Warnings"
    )
