"""The typed configuration of one StackWise run.

`StackWiseConfig` holds four sections — `model`, `training`, `data`, `tracking` — each a strict
pydantic model: unknown keys are rejected, every field carries its constraints and help text,
and assignments are validated (``config.training.training_architecture = "blockwise"`` is checked
just like a YAML value). The JSON Schema in ``schemas/`` is generated from these classes, so the
field descriptions here are also the editor documentation of experiment files.

The sections live in their own modules — `stackwise.config.model` (with the block specs of
`stackwise.config.blocks`), `stackwise.config.training`, and here `data`, `tracking` and the whole
run — and are all importable from here. Only pydantic/yaml and the YAML loader
(`stackwise.config.loading`) are imported, so validating a file never imports torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from stackwise.config.loading import load_validated
from stackwise.config.model import (
    BYTE_VOCAB_SIZE,
    ArchitectureConfig,
    AttentionMode,
    AttentionType,
    BlockOverrides,
    KernelConfig,
    MLAConfig,
    ModelConfig,
    StackConfig,
)
from stackwise.config.section import BaseConfig
from stackwise.config.training import (
    DEPTHWISE_MODES,
    BudgetConfig,
    CacheConfig,
    CheckpointConfig,
    DepthwiseConfig,
    EvalConfig,
    FrozenPrecision,
    FusionConfig,
    GrowthConfig,
    Objective,
    OptimizerConfig,
    PowerLengths,
    Precision,
    ScheduleConfig,
    TrainingArchitecture,
    TrainingConfig,
)

__all__ = [
    "BYTE_VOCAB_SIZE",
    "DEPTHWISE_MODES",
    "NOT_IDENTITY",
    "ArchitectureConfig",
    "AttentionMode",
    "AttentionType",
    "BaseConfig",
    "BlockOverrides",
    "BudgetConfig",
    "CacheConfig",
    "CheckpointConfig",
    "DataConfig",
    "DepthwiseConfig",
    "EvalConfig",
    "FrozenPrecision",
    "FusionConfig",
    "GrowthConfig",
    "KernelConfig",
    "MLAConfig",
    "ModelConfig",
    "Objective",
    "OptimizerConfig",
    "PowerLengths",
    "Precision",
    "ScheduleConfig",
    "StackConfig",
    "StackWiseConfig",
    "TrackingConfig",
    "TrainingArchitecture",
    "TrainingConfig",
]

# Settings that cannot change what a run computes, left out of its identity (`config_hash`):
# where it is recorded, checkpoint and log cadence, and where the exact activation cache lives.
# (`training.device` stays: without torch, `auto` cannot be told from `cpu`. A tracked run's
# identity replaces it with the device type it resolves to, see `stackwise.identity`.)
NOT_IDENTITY: tuple[tuple[str, ...], ...] = (
    ("tracking",),
    ("training", "checkpoint"),
    ("training", "log_every_steps"),
    ("data", "prepare_above_mb"),  # the same batches either way
    ("training", "cache", "location"),
    ("training", "cache", "directory"),
    ("training", "cache", "max_memory_gb"),
    ("training", "cache", "max_disk_gb"),
)

# --------------------------------------------------------------------------------------------
# data and tracking
# --------------------------------------------------------------------------------------------


class DataConfig(BaseConfig):
    """Where training text comes from and how it is tokenized."""

    source: Literal["builtin", "stdlib", "files", "prepared"] = Field(
        "builtin",
        description="`builtin` (English text shipped with Python: pydoc_data.topics, 0.47 MB), "
        "`stdlib` (the built-in text plus the standard library's source, about 12 MB; no "
        "download), `files`, or `prepared` (token shards written by `stackwise data prepare`, "
        "read through memory maps; the tokenizer and split are the manifest's).",
    )
    paths: list[str] = Field(
        default_factory=list,
        description="Text (.txt/.md…), JSONL, Parquet or Arrow files or globs, or folders saved "
        "with `datasets.Dataset.save_to_disk`, for source `files`; "
        "for source `prepared`, the one folder `stackwise data prepare` wrote.",
    )
    format: Literal["auto", "text", "jsonl", "parquet", "arrow"] = Field(
        "auto",
        description="File format (auto: from the extension; `.arrow`: Arrow IPC, as a folder "
        "saved with `datasets.Dataset.save_to_disk` holds).",
    )
    text_column: str = Field("text", description="Text column of JSONL/Parquet files.")
    tokenizer: Literal["byte", "bpe", "hf"] = Field(
        "byte",
        description="`byte` (no training needed), `bpe` (trained locally on the corpus) or `hf` "
        "(the Hugging Face `tokenizer.json` of `tokenizer_file`, used as it is).",
    )
    tokenizer_file: str | None = Field(
        None,
        description="A local Hugging Face `tokenizer.json` (relative: to the experiment file), "
        "for tokenizer `hf`. The special tokens [PAD] [MASK] [BOS] [EOS] it lacks are added "
        "after its vocabulary; the run's identity hashes the file's content, not its path.",
    )
    bpe_vocab_size: int = Field(4096, ge=300, description="Vocabulary size of a trained BPE.")
    val_fraction: float = Field(
        0.05, gt=0.0, lt=0.5, description="Held-out fraction for validation (deterministic)."
    )
    test_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=0.5,
        description="Held-out fraction for the final test loss (`test/loss`), taken like the "
        "validation split and never seen by training or by choices made on validation loss "
        "(0: no test split).",
    )
    split_seed: int = Field(
        0,
        ge=0,
        description="Seed of the document shuffle that decides the train/validation/test "
        "split (and what `max_tokens` keeps); independent of training.seed, so replicate "
        "seeds share one split.",
    )
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="Use at most this many corpus tokens (null: all). With bpe it counts UTF-8 "
        "bytes, applied before the tokenizer is trained on what is kept.",
    )

    prepare_above_mb: float | None = Field(
        256.0,
        gt=0,
        description="Files of source `files` larger than this many MB in all are tokenized "
        "once into memory-mapped shards in the store's folder (`prepared/`) and read from "
        "there, as `stackwise data prepare` does ahead of time; the batches are the same. "
        "null: always read into memory.",
    )

    @model_validator(mode="after")
    def _paths_for_files(self) -> DataConfig:
        if self.source == "files" and not self.paths:
            raise ValueError("paths: source `files` needs at least one path or glob")
        if self.source == "prepared" and len(self.paths) != 1:
            raise ValueError(
                "paths: source `prepared` needs exactly one path: the folder written by "
                "`stackwise data prepare`"
            )
        if self.tokenizer == "hf" and not self.tokenizer_file:
            raise ValueError("tokenizer_file: tokenizer `hf` needs the path of a tokenizer.json")
        if self.tokenizer_file and self.tokenizer != "hf":
            raise ValueError(
                f"tokenizer_file: is read by tokenizer `hf` only (tokenizer is "
                f"`{self.tokenizer}`); set data.tokenizer: hf or drop the file"
            )
        if self.val_fraction + self.test_fraction >= 0.5:
            raise ValueError(
                f"test_fraction: val_fraction + test_fraction must stay below 0.5 "
                f"(got {self.val_fraction} + {self.test_fraction})"
            )
        return self


class TrackingConfig(BaseConfig):
    """Where and how runs are recorded in MLflow."""

    uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a SQLite store "
        "in ./mlruns).",
    )
    experiment_name: str | None = Field(
        None, description="MLflow experiment (default: the experiment file's name)."
    )
    log_model: bool = Field(True, description="Log the trained Rack as an MLflow model.")
    system_metrics: bool = Field(False, description="Record CPU/GPU/memory system metrics.")
    server_wait_minutes: float = Field(
        5.0,
        gt=0,
        description="How long a run waits for a tracking server that stopped answering "
        "(training goes on, metrics are held) before it checkpoints and stops; run the same "
        "command again to resume.",
    )


# --------------------------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------------------------


class StackWiseConfig(BaseConfig):
    """Everything needed to build, train and track one run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _objective_fits_attention(self) -> StackWiseConfig:
        if self.training.objective == "clm":
            for index, stack in enumerate(self.model.resolved_stacks()):
                mode = self.model.stack_settings(stack)["attention_mode"]
                if mode != "causal":
                    field = (
                        f"model.stacks.{index}.attention_mode"
                        if self.model.stacks is not None and stack.attention_mode
                        else "model.attention_mode"
                    )
                    raise ValueError(
                        f"{field}: objective `clm` needs causal attention in every stack "
                        f"(a bidirectional block would see the token it predicts); use "
                        f"attention_mode: causal or objective mlm/diffusion"
                    )
        return self

    @model_validator(mode="after")
    def _no_frozen_last_stack_depthwise(self) -> StackWiseConfig:
        if not self.training.is_depthwise:
            return self
        stacks = self.model.resolved_stacks()
        if stacks[-1].freeze_blocks and not all(s.freeze_blocks for s in stacks):
            index = len(stacks) - 1
            raise ValueError(
                f"model.stacks.{index}.freeze_blocks: the last stack cannot be declared frozen "
                f"in depth-wise training (stackwise, blockwise/layerwise): its random blocks "
                f"would sit between the last trained piece and the readout, which is trained "
                f"without them; freeze an earlier stack or train rackwise"
            )
        return self

    def stage_count(self) -> int:
        """Number of stages the budget is split over (the fusion phase has its own budget)."""
        stacks = [s for s in self.model.resolved_stacks() if not s.freeze_blocks]
        mode = self.training.training_architecture
        if mode == "rackwise":
            return 1
        if mode == "stackwise":
            return len(stacks)
        if mode == "progressive":
            return len(self.growth_sizes())
        return sum(s.n_blocks for s in stacks)

    def growth_sizes(self) -> list[int]:
        """Stacks trained in each stage of a progressive run: 1, 2, … K (or 1, 2, 4 … K)."""
        n = len(self.model.resolved_stacks())
        if self.training.growth.schedule == "per_stack":
            return list(range(1, n + 1))
        sizes = [1]
        while sizes[-1] < n:
            sizes.append(sizes[-1] * 2)
        return sizes

    @model_validator(mode="after")
    def _budget_covers_stages(self) -> StackWiseConfig:
        training = self.training
        budget = training.budget
        stages = self.stage_count()
        if stages == 0:
            return self  # every stack declared frozen: reported when the stages are planned
        per_step = training.batch_size * training.grad_accum_steps * training.seq_len
        steps = budget.steps
        field = "training.budget.steps"
        if budget.tokens is not None:
            steps, field = max(1, round(budget.tokens / per_step)), "training.budget.tokens"
        if steps is not None and steps < stages:
            raise ValueError(
                f"{field}: the budget gives {steps} optimizer step(s), fewer than the "
                f"{stages} stages of this {training.training_architecture} run (each stage needs "
                f"at least one); raise the budget"
            )
        return self

    @model_validator(mode="after")
    def _out_of_core_needs_a_cached_trunk(self) -> StackWiseConfig:
        training = self.training
        if not training.out_of_core:
            return self
        mode = training.mode_label
        why = None
        if not training.is_depthwise:
            why = f"{mode} training needs the whole rack in memory; use stackwise or blockwise"
        elif training.depthwise.data != "pool":
            why = "depthwise.data: fresh re-runs the whole frozen trunk every step; use pool"
        elif not training.cache.enabled:
            why = "without the activation cache the whole frozen trunk runs every step"
        elif training.fusion.enabled:
            why = "the fusion phase trains the whole rack at once"
        if why is not None:
            raise ValueError(f"training.out_of_core: {why}")
        return self

    @model_validator(mode="after")
    def _fusion_share_needs_flops(self) -> StackWiseConfig:
        fusion = self.training.fusion
        if (
            fusion.enabled
            and fusion.flops_fraction is not None
            and self.training.budget.flops is None
        ):
            raise ValueError(
                "training.fusion.flops_fraction: a share of the FLOPs budget needs "
                "training.budget.flops; give fusion steps or tokens instead"
            )
        return self

    @model_validator(mode="after")
    def _progressive_settings(self) -> StackWiseConfig:
        training = self.training
        if training.training_architecture != "progressive":
            return self
        growth = training.growth
        stacks = self.model.resolved_stacks()
        where = "model.stacks" if self.model.stacks is not None else "model.architecture"
        if training.fusion.enabled:
            raise ValueError(
                "training.fusion.enabled: a progressive run's last stage already trains the "
                "whole rack; turn fusion off"
            )
        frozen = [i for i, s in enumerate(stacks) if s.freeze_blocks]
        if frozen:
            raise ValueError(
                f"model.stacks.{frozen[0]}.freeze_blocks: a progressive run trains every stack; "
                f"declared frozen stacks are for depth-wise and rackwise runs"
            )
        n = len(stacks)
        if growth.schedule == "doubling":
            if n & (n - 1):
                allowed = ", ".join(str(2**i) for i in range(6))
                raise ValueError(
                    f"training.growth.schedule: doubling needs a power-of-two number of stacks "
                    f"({allowed} …), this rack has {n} ({where}); use schedule: per_stack"
                )
            if growth.init == "copy_middle":
                raise ValueError(
                    "training.growth.init: copy_middle inserts one stack at a time; with "
                    "schedule: doubling use copy_last (the trunk copied on top of itself) or random"
                )
        if growth.init != "random":
            first = self._stack_shape(stacks[0])
            for index, stack in enumerate(stacks[1:], start=1):
                differ = [k for k, v in self._stack_shape(stack).items() if first[k] != v]
                if stack.n_blocks != stacks[0].n_blocks:
                    differ.insert(0, "n_blocks")
                if differ:
                    raise ValueError(
                        f"training.growth.init: {growth.init} starts new stacks as copies, but "
                        f"model.stacks.{index} differs from model.stacks.0 in "
                        f"{', '.join(differ)}; give the stacks one shape or use init: random"
                    )
        return self

    def _stack_shape(self, stack: StackConfig) -> dict[str, Any]:
        """What must match for one stack's weights to be copied into another."""
        settings = self.model.stack_settings(stack)
        del settings["dropout"]
        return settings

    @model_validator(mode="after")
    def _copy_previous_shapes(self) -> StackWiseConfig:
        training = self.training
        mode = training.training_architecture
        if not training.is_depthwise or training.depthwise.init != "copy_previous":
            return self
        stacks = self.model.resolved_stacks()
        shape = self._stack_shape

        trained = [(i, s) for i, s in enumerate(stacks) if not s.freeze_blocks]
        for (i, previous), (j, stack) in itertools.pairwise(trained):
            differ = [k for k, v in shape(stack).items() if shape(previous)[k] != v]
            if mode == "stackwise" and previous.n_blocks != stack.n_blocks:
                differ.insert(0, "n_blocks")
            if differ:
                raise ValueError(
                    f"training.depthwise.init: copy_previous starts model.stacks.{j} as a copy "
                    f"of the piece before it (model.stacks.{i}), but they differ in "
                    f"{', '.join(differ)}; give the stacks the same shape or use init: random"
                )
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackWiseConfig:
        return cls.model_validate(data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> StackWiseConfig:
        """Load and validate a config file.

        Safe YAML; duplicate and unknown keys are errors. Raises
        `stackwise.config.errors.ConfigError` naming the file, line and dotted field.
        """
        return load_validated(path, cls)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; also written to `path` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def identity_dict(self) -> dict[str, Any]:
        """The settings that can change what a run computes: the config without
        `NOT_IDENTITY` (where it is recorded, checkpoint and log cadence, where the activation
        cache lives)."""
        payload = self.to_dict()
        for path in NOT_IDENTITY:
            section = payload
            for key in path[:-1]:
                section = section.get(key, {})
            section.pop(path[-1], None)
        if not self.training.is_depthwise:
            # Depth-wise settings change nothing in other runs, growth settings nothing
            # outside progressive runs.
            payload["training"].pop("depthwise", None)
        if self.training.training_architecture != "progressive":
            payload["training"].pop("growth", None)
        if not self.model.uses_favor:
            # How FAVOR+ draws its features changes nothing without FAVOR+ attention.
            payload["model"]["kernel"].pop("favor_sampling", None)
        if self.data.tokenizer_file is None:  # as configs written before the setting existed
            payload["data"].pop("tokenizer_file", None)
        return payload

    def config_hash(self) -> str:
        """Identity of the config: sha256 of the canonical JSON of `identity_dict`.

        Needs no data access. A tracked run's identity adds what the config only names: the
        content of its data files and the device type and precision it resolves to
        (`stackwise.identity.run_identity`).
        """
        canonical = json.dumps(self.identity_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
