"""Training one point inside its MLflow run: data, rack, trainer, logging and the model.

`train_in_run` is the part of a point that runs the trainer: it resumes a checkpoint only if
written under exactly the trainer's config (`CHECKPOINT_TRAINER_HASH`), logs every step with
`stackwise.tracking.logger.MlflowLogger` (without logging again the steps an adopted run
already has, after sending the metrics a run stopped by an unreachable tracking server saved
beside its checkpoint), samples system metrics when asked, and logs the trained rack.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stackwise.tracking.logger import (
    TAG_CONFIG_HASH,
    MlflowLogger,
    log_dataset,
    log_params,
)
from stackwise.tracking.metric_writer import UNSENT_METRICS_FILE, logged_steps, send_unsent
from stackwise.tracking.progress import GridProgress, plain

if TYPE_CHECKING:
    from stackwise.config.base import DataConfig
    from stackwise.runner.grid import Grid
    from stackwise.runner.options import Lockstep
    from stackwise.runner.point import Point

CHECKPOINT_RUN_ID = "mlflow_run_id"
CHECKPOINT_TRAINER_HASH = "trainer_config_hash"  # the trainer's own check on resume


def train_in_run(
    grid: Grid,
    point: Point,
    run_id: str,
    folder: Path,
    progress: GridProgress,
    adopted: bool = False,
    lockstep: Lockstep | None = None,
) -> tuple[MlflowLogger, Any, dict[str, float]]:
    """Build data and rack, train with logging, log the model. Returns what must be closed."""
    from stackwise.api import load_data, train
    from stackwise.tracking.models import log_rack
    from stackwise.training.checkpoint import read_checkpoint_metadata

    # Metrics a stopped run could not send go first: the checkpoint may be discarded below.
    unsent = send_unsent(grid.client, run_id, folder / UNSENT_METRICS_FILE)
    if unsent:
        progress.print(f"    {plain(point.spec.name)}: sent {unsent} metrics the last attempt kept")
    config, data = load_data(point.config, _prepared(grid, point, progress))
    if not adopted:  # an adopted run recorded its data when it started
        counts = {"train_tokens": data.train_tokens, "val_tokens": data.val_tokens}
        counts["test_tokens"] = data.test_tokens
        log_dataset(grid.client, run_id, point.config.data, point.data_fingerprint, counts)
    if point.config.model.vocab_size is None:
        # The same value again on resume, which MLflow accepts.
        log_params(grid.client, run_id, {"model.vocab_size": str(config.model.vocab_size)})
    # The trainer resumes only a checkpoint of exactly its config; one written under settings
    # outside the identity (a device name, a data path of the same content) is started over.
    trainer_hash = config.config_hash()
    if lockstep is not None and lockstep.world > 1:  # resumes with the same number of processes
        trainer_hash = f"{trainer_hash}-world{lockstep.world}"
    metadata = read_checkpoint_metadata(folder) if folder.exists() else None
    if metadata is not None and metadata.get(CHECKPOINT_TRAINER_HASH, trainer_hash) != trainer_hash:
        shutil.rmtree(folder, ignore_errors=True)
        progress.print(
            f"    {plain(point.spec.name)}: its checkpoint was written under other settings outside the "
            f"run identity (a device name, a data path, the number of processes); starting over "
            f"inside run {run_id}"
        )
    training = config.training
    logger = MlflowLogger(
        grid.client,
        run_id,
        tokens_per_step=training.batch_size * training.grad_accum_steps * training.seq_len,
        # Steps an adopted run already has (before its checkpoint, or before it was killed
        # without one) are replayed exactly; record them only once.
        already_logged=logged_steps(grid.client, run_id) if adopted else None,
        server_wait=config.tracking.server_wait_minutes * 60,
        spill_path=folder / UNSENT_METRICS_FILE,
        notify=lambda line: progress.print(f"    [yellow]{plain(line)}[/]", important=True),
    )
    monitor = None
    if config.tracking.system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=5, resume_logging=True, tracking_uri=grid.uri
        )
        monitor.start()
    try:
        if lockstep is not None:  # torchrun: the other ranks start the same training now
            lockstep.begin(point, folder)
        trained = train(
            config,
            data=data,
            callbacks=[logger, progress.start_run(point.spec.name)],
            checkpoint_dir=folder,
            resume=True,
            checkpoint_metadata={
                CHECKPOINT_RUN_ID: run_id,
                TAG_CONFIG_HASH: point.identity,
                CHECKPOINT_TRAINER_HASH: trainer_hash,
            },
        )
        rack, results = trained.rack, trained.results
        extra = {
            "parameters": float(rack.get_parameter_count()),
            "train_corpus_tokens": float(data.train_tokens),
            "val_corpus_tokens": float(data.val_tokens),
            "test_corpus_tokens": float(data.test_tokens),
            # passes over the training data a run's tokens amount to (repeats past ~4 lose value)
            "epochs": results.total_tokens / max(data.train_tokens, 1),
        }
        logger.log_metrics(extra, results.total_steps)
        logger.writer.flush()
        if config.tracking.log_model:
            tokenizer_json = getattr(data.tokenizer, "to_json", None)
            log_rack(
                rack,
                run_id,
                grid.experiment_id,
                grid.uri,
                tokenizer_json=tokenizer_json() if callable(tokenizer_json) else None,
                weights_dir=results.weights_dir,
                name=point.spec.title,
                step=results.total_steps,
            )
    except BaseException:
        # The caller closes these on success; on failure it only knows them through us.
        close_quietly(logger, monitor)
        raise
    return logger, monitor, results.summary_metrics()


def _prepared(grid: Grid, point: Point, progress: GridProgress) -> DataConfig | None:
    """The point's files as token shards beside the store when they are too large to read
    into memory (`stackwise.data.prepared.auto_prepare`); None to read them into memory."""
    from stackwise.data.prepared import auto_prepare
    from stackwise.tracking.store import local_root

    def report(message: str) -> None:
        progress.print(f"    {plain(point.spec.name)}: {plain(message)}", important=True)

    data, seq_len = point.config.data, point.config.training.seq_len
    return auto_prepare(data, seq_len, local_root(grid.uri), report)


def close_quietly(logger: MlflowLogger | None, monitor: Any) -> None:
    """Flush what can be flushed while handling another error (that error is what matters)."""
    if monitor is not None:
        with contextlib.suppress(Exception):
            monitor.finish()
    if logger is not None:
        with contextlib.suppress(Exception):
            logger.close(wait=False)  # a server that takes nothing: saved to the spill file
