"""Training from Python: `stackwise.train(config)` runs one config end to end, without MLflow.

    from stackwise import train
    trained = train("run.yaml")           # or a StackWiseConfig, or its dict
    trained.results.final_test_loss       # TrainingResults
    trained.rack                          # the trained Rack

The steps, the same ones `stackwise run` takes for every grid point (`stackwise.runner`) and a
torchrun rank takes (`stackwise.executors.torchrun`):

1. Data (`load_data`): read, split, tokenize and pack the configured corpus
   (`stackwise.data.build_data`); a config without ``model.vocab_size`` takes the tokenizer's.
2. Rack (`build_rack`): built from the config, seeded with ``training.seed``. An out-of-core run
   builds it on the meta device: its blocks are drawn when their stage starts.
3. Trainer: `ArchitectureTrainer` trains the rack in place on the training split, evaluates on
   the validation split and, once at the end, on the test split; `callbacks` receive its
   progress and `checkpoint_dir` holds its checkpoints (resumed from by default).

What is recorded where (MLflow, the run's identity, its lock) is the runner's business, not
this module's: it only trains.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from stackwise.config.base import DataConfig, StackWiseConfig
    from stackwise.data import DataBundle
    from stackwise.model.architecture import Rack
    from stackwise.training.callbacks import TrainingCallback, TrainingResults

__all__ = ["TrainedRun", "build_rack", "load_data", "train"]


@dataclass
class TrainedRun:
    """What `train` returns: the results and what they were computed with."""

    results: TrainingResults
    rack: Rack  # trained in place (out of core: blocks on the meta device, weights in results)
    data: DataBundle | None  # None when trained on given batches
    config: StackWiseConfig  # as trained: ``model.vocab_size`` filled in from the tokenizer


def as_config(config: StackWiseConfig | Mapping[str, Any] | str | Path) -> StackWiseConfig:
    """A `StackWiseConfig` from itself, its dict, or the path of a YAML file (validated)."""
    from stackwise.config.base import StackWiseConfig

    if isinstance(config, StackWiseConfig):
        return config
    if isinstance(config, str | Path):
        return StackWiseConfig.from_yaml(config)
    return StackWiseConfig.from_dict(dict(config))


def with_vocabulary(config: StackWiseConfig, data: DataBundle) -> StackWiseConfig:
    """`config` with ``model.vocab_size`` set to the tokenizer's when it is unset (a copy; the
    config itself when it is set)."""
    if config.model.vocab_size is not None:
        return config
    config = config.model_copy(deep=True)
    config.model.vocab_size = data.tokenizer.vocab_size
    return config


def load_data(
    config: StackWiseConfig, source: DataConfig | None = None
) -> tuple[StackWiseConfig, DataBundle]:
    """The run's data (read as `source` says when given: the same corpus prepared, see
    `stackwise.data.prepared.auto_prepare`), and its config with the vocabulary size the
    tokenizer gives."""
    from stackwise.data import build_data

    data = build_data(source or config.data, config.training)
    return with_vocabulary(config, data), data


def build_rack(config: StackWiseConfig) -> Rack:
    """The untrained rack of `config`; on the meta device for an out-of-core run (the trainer
    draws each block when its stage starts)."""
    from stackwise.model.architecture import create_rack_from_config

    if config.training.out_of_core:
        from stackwise.model.materialize import meta_device

        with meta_device():
            return create_rack_from_config(config)
    return create_rack_from_config(config)


def train(
    config: StackWiseConfig | Mapping[str, Any] | str | Path,
    *,
    callbacks: Iterable[TrainingCallback] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    checkpoint_metadata: Mapping[str, str] | None = None,
    data: DataBundle | None = None,
    batches: Iterable[torch.Tensor] | None = None,
    rack: Rack | None = None,
) -> TrainedRun:
    """Train `config` (a `StackWiseConfig`, its dict or a YAML path): data -> rack -> trainer.

    `callbacks` receive the trainer's progress (`stackwise.training.callbacks.TrainingCallback`);
    `checkpoint_dir` enables checkpoints and, with `resume`, continues from the newest one;
    `checkpoint_metadata` is stored in every checkpoint. `data` reuses data already built for
    this config (`load_data`) instead of building it again. `batches` (token-id tensors
    ``[B, T]``) replace the configured corpus: the run trains on them, with no validation or
    test split and ``data`` None in the result (synthetic data, as the benchmarks use); without
    ``model.vocab_size`` the rack has the byte tokenizer's 260. `rack` is an untrained rack already built from this
    config (`build_rack`), to count or hook before training; it is trained in place. Raises
    `stackwise.training.architecture_trainer.TrainingError` for a run that cannot go on (a
    non-finite loss, out of memory).
    """
    from stackwise.training.architecture_trainer import ArchitectureTrainer

    resolved = as_config(config)
    if batches is not None:
        if data is not None:
            raise ValueError("give data or batches, not both")
    elif data is None:
        resolved, data = load_data(resolved)
    else:
        resolved = with_vocabulary(resolved, data)
    if rack is None:
        rack = build_rack(resolved)
    trainer = ArchitectureTrainer(
        resolved,
        callbacks=list(callbacks),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        checkpoint_metadata=None if checkpoint_metadata is None else dict(checkpoint_metadata),
        mask_token_id=None if data is None else data.tokenizer.mask_id,
    )
    if data is None:
        results = trainer.train_architecture(rack, list(batches or ()))
    else:
        results = trainer.train_architecture(
            rack, data.train_loader, data.val_loader, data.test_loader
        )
    return TrainedRun(results=results, rack=rack, data=data, config=resolved)
