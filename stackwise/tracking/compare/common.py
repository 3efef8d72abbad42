"""What every part of a comparison shares: its columns, the metric names `--metric` accepts,
the formats and aggregations there are, and the error for a mistaken request."""

from __future__ import annotations

FORMATS = ("table", "csv", "markdown", "json", "parquet")
AGGREGATIONS = ("mean", "min", "max", "last", "std", "sem", "count")
# Bookkeeping column: the tuned settings' column names (see `stackwise.tracking.evidence`).
TUNED_AXES = "tuned_axes"

# Result columns: name in the frame -> MLflow metric (summary metrics of a finished run).
RESULT_COLUMNS: dict[str, str] = {
    "val_loss": "final_val_loss",
    "test_loss": "final_test_loss",
    "perplexity": "final_val_perplexity",
    "flops": "flops",
    "tokens_seen": "tokens_seen",
    "unique_tokens": "unique_tokens",
    "tokens_per_s": "tokens_per_s",
    "peak_memory_mb": "peak_memory_bytes",
    "training_memory_mb": "training_memory_bytes",
    "cache_memory_mb": "cache_memory_bytes",
    "cache_disk_mb": "cache_disk_bytes",
    "wall_time_s": "wall_time_s",
    "epochs": "epochs",
    "parameters": "parameters",
}
INTEGER_COLUMNS = ("tokens_seen", "unique_tokens", "parameters")
# Friendly names accepted by `--metric`.
METRIC_ALIASES: dict[str, str] = {
    "loss": "val_loss",
    "final_val_loss": "val_loss",
    "val/loss": "val_loss",
    "final_test_loss": "test_loss",
    "test/loss": "test_loss",
    "final_val_perplexity": "perplexity",
    "val/perplexity": "perplexity",
    "ppl": "perplexity",
    "peak_memory": "peak_memory_mb",
    "memory": "peak_memory_mb",
    "peak_memory_bytes": "peak_memory_mb",
    "wall_time": "wall_time_s",
    "time": "wall_time_s",
    "params": "parameters",
}
DEFAULT_METRIC = "val_loss"
# The depth-wise head setting, shown as the `head` column (blank for rackwise runs).
HEAD_PARAM = "training.depthwise.head"
# The columns that name a run in a table (repeated in each part of a folded table).
KEY_COLUMNS = ("experiment", "run")
# Columns that describe a run but are neither a coordinate nor a result: they never explain
# why two runs share a pivot cell, and never pick a plot's line style.
RUN_BOOKKEEPING = (
    "run",
    "status",
    "current",
    "start_time",
    "config_hash",
    "run_id",
    "parent_run_id",
)


class CompareError(ValueError):
    """A user mistake in a compare request (unknown experiment, column, format …)."""


def resolve_metric(metric: str | None) -> str:
    """A `--metric` value -> frame column name (aliases allowed; other names are MLflow keys)."""
    if metric is None:
        return DEFAULT_METRIC
    return METRIC_ALIASES.get(metric, metric)


def plural(count: int, word: str) -> str:
    """``"1 run"``, ``"3 runs"``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def store_error(error: BaseException) -> str | None:
    """What went wrong reading a tracking store, where `error` is MLflow's, SQLite's or the
    schema check's (a store that exists but cannot be read as asked), else None. Nothing is
    imported for this: such an error can only come from a process that imported its module."""
    import sqlite3
    import sys

    errors = sys.modules.get("mlflow.exceptions")
    if errors is not None and isinstance(error, errors.MlflowException):
        return str(error.message)
    if isinstance(error, sqlite3.Error):
        return str(error)
    # MLflow's SQL store checks the database's schema revision with alembic, whose error for a
    # revision it does not know (a store written by another MLflow version) is not MLflow's.
    migrations = sys.modules.get("alembic.util.exc")
    if migrations is not None and isinstance(error, migrations.CommandError):
        return f"{error} (written by another MLflow version?)"
    return None
