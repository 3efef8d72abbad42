"""What the comparison plots draw, read from MLflow: one `RunCurve` per run of a comparison
frame, the points of its validation curve against FLOPs, tokens or wall-clock seconds, and the
mean of replicates.

Wall-clock seconds come from the timestamps MLflow stores with each metric (taken when the
trainer reports it): a validation point's time is its ``val/loss`` timestamp less that of the
run's first ``stage/index`` (step 0, when training starts). A resumed run's seconds include the
time it was stopped."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

from stackwise.tracking.compare.common import RESULT_COLUMNS, RUN_BOOKKEEPING, TUNED_AXES

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from stackwise.tracking.sqlite_runs import SqliteRuns

    Reader = MlflowClient | SqliteRuns

# (run id, metric key) -> [(step, value)], oldest step first.
MetricHistory = Callable[[str, str], list[tuple[int, float]]]
X_AXES = ("flops", "tokens", "seconds")  # what a loss curve can be drawn against


@dataclass
class RunCurve:
    """What the plots draw for one run: its validation curve, the cumulative tokens and FLOPs
    logged with the train metrics and the seconds since training started at each validation
    (the x axes), stage boundaries, and its final results."""

    label: str
    mode: str
    style: str  # the run's other grid coordinates, e.g. "size=small"; picks line style/marker
    val: list[tuple[int, float]]
    tokens: list[tuple[int, float]]
    flops: list[tuple[int, float]]
    stage_starts: list[int] = field(default_factory=list)  # steps where stages 2… begin
    final_val_loss: float | None = None
    final_tokens: float | None = None
    final_flops: float | None = None
    peak_memory_mb: float | None = None  # the process's peak (RSS, or the device's peak)
    # Weights, gradients, optimizer state and saved activations of the largest stage.
    training_memory_mb: float | None = None
    wall_time_s: float | None = None
    # The other grid coordinates by name ({"size": "small"}): the loss plot colours a mode's
    # lines by the one that varies most within the mode.
    coordinates: dict[str, str] = field(default_factory=dict)
    # (step, seconds since training started) of each validation point (`client_timestamps`).
    seconds: list[tuple[int, float]] = field(default_factory=list)
    # Replicates (runs of one grid point and tuned values that differ only in their seed) share
    # a group: the loss plot draws their mean with a min-max band.
    group: str | None = None

    @property
    def final_loss(self) -> float | None:
        """The final validation loss: the summary metric, else the last one evaluated."""
        if self.final_val_loss is None and self.val:
            return self.val[-1][1]
        return self.final_val_loss


def client_history(clients: Reader | Mapping[str, Reader]) -> MetricHistory:
    """A `MetricHistory` reading one store, or each run's own store (``run id -> client``)."""

    def history(run_id: str, key: str) -> list[tuple[int, float]]:
        client = clients[run_id] if isinstance(clients, Mapping) else clients
        by_step = {int(m.step): float(m.value) for m in client.get_metric_history(run_id, key)}
        return sorted(by_step.items())

    return history


def client_timestamps(clients: Reader | Mapping[str, Reader]) -> MetricHistory:
    """A `MetricHistory` of when each step's metric was logged (MLflow's timestamp, seconds)."""

    def history(run_id: str, key: str) -> list[tuple[int, float]]:
        client = clients[run_id] if isinstance(clients, Mapping) else clients
        metrics = client.get_metric_history(run_id, key)
        return sorted({int(m.step): m.timestamp / 1000 for m in metrics}.items())

    return history


def load_curves(
    frame: pl.DataFrame, history: MetricHistory, times: MetricHistory | None = None
) -> list[RunCurve]:
    """One `RunCurve` per row of a comparison frame, in its order; `times` (see
    `client_timestamps`) gives each validation point its wall-clock seconds."""
    mode_column = "mode" if "mode" in frame.columns else "training_architecture"
    style_columns = [
        c
        for c in frame.columns
        if c != mode_column
        and c not in (*RUN_BOOKKEEPING, "training_architecture", "point", TUNED_AXES)
        and c not in RESULT_COLUMNS
        and frame.schema[c] == pl.String
        and frame[c].drop_nulls().n_unique() > 1  # blank where it does not apply (head)
    ]
    names = frame["run"].to_list() if "run" in frame.columns else []
    repeated = len(set(names)) < len(names)
    curves: list[RunCurve] = []
    for row in frame.iter_rows(named=True):
        run_id = row["run_id"]
        label = str(row.get("run") or run_id)
        if "experiment" in style_columns:
            label = f"{row['experiment']}/{label}"
        if repeated and row.get("config_hash"):
            label = f"{label} [{str(row['config_hash'])[:7]}]"
        stages = history(run_id, "stage/index")
        group = None
        if row.get("seed") is not None and "point" in frame.columns:
            group = label.removesuffix(f",seed={row['seed']}")
        curves.append(
            RunCurve(
                group=group,
                label=label,
                mode=str(row.get(mode_column) or "?"),
                style=", ".join(f"{c}={row[c]}" for c in style_columns if row[c] is not None),
                coordinates={c: str(row[c]) for c in style_columns if row[c] is not None},
                val=history(run_id, "val/loss"),
                tokens=history(run_id, "train/tokens"),
                flops=history(run_id, "train/flops"),
                stage_starts=[step for step, index in stages if index > 0],
                final_val_loss=row.get("val_loss"),
                final_tokens=_final_tokens(row, history),
                final_flops=row.get("flops"),
                peak_memory_mb=row.get("peak_memory_mb"),
                training_memory_mb=row.get("training_memory_mb"),
                wall_time_s=row.get("wall_time_s"),
                seconds=_seconds(run_id, times) if times is not None else [],
            )
        )
    return curves


def _seconds(run_id: str, times: MetricHistory) -> list[tuple[int, float]]:
    """(step, seconds since training started) of each ``val/loss`` of a run; nothing when the
    run has no training start (``stage/index`` at step 0) or no timestamps (all zero)."""
    starts = times(run_id, "stage/index")
    if not starts or starts[0][0] != 0 or starts[0][1] <= 0:
        return []
    start = starts[0][1]
    val = times(run_id, "val/loss")
    if any(seconds < start for _, seconds in val):
        return []
    return [(step, seconds - start) for step, seconds in val]


def _final_tokens(row: dict[str, Any], history: MetricHistory) -> float | None:
    """Training tokens of a finished run: ``tokens_seen``, else (older runs) ``total_tokens``."""
    if row.get("tokens_seen") is not None:
        return float(row["tokens_seen"])
    series = history(row["run_id"], "total_tokens")
    return series[-1][1] if series else None


def _at(series: Sequence[tuple[int, float]], step: int) -> float:
    """The cumulative value of `series` at `step`: exact where logged, linear in between (within
    a stage the cost per step is constant, and each stage end is logged), proportional to the
    step before the first and after the last point."""
    steps = [s for s, _ in series]
    index = bisect.bisect_left(steps, step)
    if index < len(steps) and steps[index] == step:
        return series[index][1]
    if index in (0, len(steps)):
        edge_step, edge = series[0] if index == 0 else series[-1]
        return edge * step / edge_step if edge_step else edge
    (s0, v0), (s1, v1) = series[index - 1], series[index]
    return v0 + (v1 - v0) * (step - s0) / (s1 - s0)


def curve_points(curve: RunCurve, x: str) -> tuple[list[float], list[float], list[int]]:
    """x values (`x`: one of `X_AXES`), val losses and the indices of stage-boundary points of
    one run's curve.

    A run without the per-step series (recorded before it was logged, or without timestamps)
    is drawn as its final point only, when it has the summary value (``flops``,
    ``tokens_seen``, ``wall_time_s``): nothing is guessed."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, not {x!r}")
    series = {"flops": curve.flops, "tokens": curve.tokens, "seconds": curve.seconds}[x]
    final = {"flops": curve.final_flops, "tokens": curve.final_tokens}.get(x, curve.wall_time_s)
    if not series:
        loss = curve.final_loss
        if final is None or not curve.val or loss is None:
            return [], [], []
        return [final], [loss], []
    xs = [_at(series, step) for step, _ in curve.val]
    ys = [value for _, value in curve.val]
    boundaries = set(curve.stage_starts)
    marks = [i for i, (step, _) in enumerate(curve.val) if step in boundaries]
    return xs, ys, marks


def replicate_groups(curves: Sequence[RunCurve]) -> list[list[RunCurve]]:
    """Curves grouped by replicate group (a curve without one is its own group), in order."""
    groups: dict[str, list[RunCurve]] = {}
    for index, curve in enumerate(curves):
        groups.setdefault(curve.group or f"\0{index}", []).append(curve)
    return list(groups.values())


def mean_curve(
    group: Sequence[RunCurve], x: str
) -> tuple[list[float], list[float], list[float], list[float], list[int]]:
    """x, mean, min and max of the validation losses of replicates, over the evaluation points
    they all have (replicates evaluate at the same steps and FLOPs; a shorter curve, e.g. an
    unfinished run, cuts the others), and the stage-boundary indices of the first. x is the
    mean over the replicates too (the same FLOPs and tokens; seconds differ)."""
    points = [curve_points(curve, x) for curve in group]
    length = min(len(xs) for xs, _, _ in points)
    marks = points[0][2]
    columns = [[ys[i] for _, ys, _ in points] for i in range(length)]
    means = [sum(c) / len(c) for c in columns]
    xs = [sum(p[0][i] for p in points) / len(points) for i in range(length)]
    return (
        xs,
        means,
        [min(c) for c in columns],
        [max(c) for c in columns],
        [m for m in marks if m < length],
    )


def final_point(curve: RunCurve) -> tuple[float, float] | None:
    """(memory MiB, final val loss) of a run, or None when it has no result: its training
    memory, or the process's peak for a run that did not record it (`uses_training_memory`)."""
    loss = curve.final_loss
    memory = curve.training_memory_mb if uses_training_memory(curve) else curve.peak_memory_mb
    if loss is None or memory is None:
        return None
    return float(memory), float(loss)


def uses_training_memory(curve: RunCurve) -> bool:
    """Whether `final_point` places a run at its training memory (else at its peak memory)."""
    return curve.training_memory_mb is not None and curve.training_memory_mb > 0
