"""Checkpoints of a training run: written atomically, read without unpickling.

A checkpoint is a folder ``<checkpoint_dir>/ckpt-<global step>-<stage>`` holding

- ``model.safetensors``: the rack's weights (tensors shared by several names, such as a tied
  LM head, are stored once; the aliases are in the file's metadata),
- ``optimizer.pt``: the optimizer and LR-scheduler state dicts (plain tensors and numbers),
- ``rng.pt``: the global torch RNG states and the trainer's corruption generator,
- ``state.json``: where the run stands (stage, step, data position, results so far),
- ``metadata.json``: caller-supplied strings (``checkpoint_metadata``), e.g. a tracking run id.

It is written into a temporary folder and renamed into place, and only then is the ``latest``
pointer file replaced (also by rename), so a kill at any moment leaves the previous checkpoint
intact. ``.pt`` files are read with ``torch.load(weights_only=True)``: nothing is unpickled
beyond tensors and plain containers.

`RunCheckpoints` are the checkpoints of one training run: when one is due
(``training.checkpoint``), writing the run's position (`stackwise.training.position`) as its
state, and reading the newest back for a resume, refused when it belongs to another config or
stage plan.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stackwise.config.base import CheckpointConfig
from stackwise.training.errors import TrainingError
from stackwise.training.position import RunPosition

LATEST = "latest"
PREFIX = "ckpt-"


@dataclass
class Checkpoint:
    """A checkpoint read back from disk."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    rng: dict[str, Any]
    state: dict[str, Any]
    metadata: dict[str, str]


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory once; return the kept tensors and alias -> name."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = (
            tensor.untyped_storage().data_ptr(),
            int(tensor.storage_offset()),
            tuple(int(s) for s in tensor.shape),
        )
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = tensor.detach().to("cpu").contiguous()
    return kept, aliases


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


def _replace_file(path: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def save_checkpoint(
    checkpoint_dir: str | Path,
    *,
    name: str,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any] | None,
    scheduler: dict[str, Any] | None,
    rng: dict[str, Any],
    state: dict[str, Any],
    metadata: dict[str, str] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write a checkpoint atomically and point ``latest`` at it; prune old ones."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-ckpt-"))
    try:
        kept, aliases = _dedupe(weights)
        save_file(kept, str(temp / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
        torch.save({"optimizer": optimizer, "scheduler": scheduler}, temp / "optimizer.pt")
        torch.save(rng, temp / "rng.pt")
        _write_json(temp / "state.json", state)
        _write_json(temp / "metadata.json", dict(metadata or {}))
        final = root / f"{PREFIX}{name}"
        if final.exists():
            trash = Path(tempfile.mkdtemp(dir=root, prefix=".old-"))
            os.replace(final, trash / final.name)
            os.replace(temp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _replace_file(root / LATEST, final.name)
    _prune(root, keep_last, keep=final.name)
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    checkpoints = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
    old = [p for p in checkpoints if p.name != keep][: max(0, len(checkpoints) - keep_last)]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `checkpoint_dir`, or None."""
    root = Path(checkpoint_dir)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text(encoding="utf-8").strip()
        if (path / "state.json").is_file():
            return path
    if not root.is_dir():
        return None
    complete = sorted(
        p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()
    )
    return complete[-1] if complete else None


def read_checkpoint_metadata(checkpoint_dir: str | Path) -> dict[str, str] | None:
    """The ``checkpoint_metadata`` of the newest checkpoint (None when there is none)."""
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None
    data = json.loads((path / "metadata.json").read_text(encoding="utf-8"))
    return {str(k): str(v) for k, v in data.items()}


def load_checkpoint(checkpoint_dir: str | Path) -> Checkpoint | None:
    """Read the newest checkpoint (weights on CPU), or None when there is none."""
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        header = handle.metadata() or {}
    weights = load_file(str(path / "model.safetensors"))
    for alias, name in json.loads(header.get("aliases", "{}")).items():
        weights[alias] = weights[name]
    optim = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
    return Checkpoint(
        path=path,
        weights=weights,
        optimizer=optim["optimizer"],
        scheduler=optim["scheduler"],
        rng=rng,
        state=json.loads((path / "state.json").read_text(encoding="utf-8")),
        metadata=json.loads((path / "metadata.json").read_text(encoding="utf-8")),
    )


class RunCheckpoints:
    """The checkpoints of one run in `directory` (see the module docstring); `metadata` is
    stored in every one of them."""

    def __init__(
        self, directory: str | Path, settings: CheckpointConfig, metadata: dict[str, str]
    ) -> None:
        self.directory = Path(directory)
        self.settings = settings
        self.metadata = dict(metadata)
        self._last = time.perf_counter()  # when the time cadence last started

    def start(self) -> None:
        """Training starts (or resumes) now: the time cadence counts from here."""
        self._last = time.perf_counter()

    def due(self, global_step: int) -> bool:
        """Whether a checkpoint is due after global step `global_step`: every
        ``every_steps`` steps, or once ``every_minutes`` have passed since the last checkpoint
        (or the start), so a hard kill (SIGKILL, a lost node) loses at most that."""
        every_steps = self.settings.every_steps
        if every_steps and global_step % every_steps == 0:
            return True
        minutes = self.settings.every_minutes
        return minutes is not None and time.perf_counter() - self._last >= minutes * 60.0

    def taken(self) -> None:
        """A checkpoint is taken now (every rank of a run notes it; rank 0 writes it)."""
        self._last = time.perf_counter()

    def write(
        self,
        position: RunPosition,
        *,
        weights: dict[str, torch.Tensor],
        optimizer: dict[str, Any] | None,
        scheduler: dict[str, Any] | None,
        rng: dict[str, Any],
    ) -> Path:
        """Write a checkpoint of the run at `position`, named by its global step, stage and
        step in the stage."""
        name = f"{position.global_step:08d}-{position.stage_index:03d}-{position.step_in_stage:06d}"
        return save_checkpoint(
            self.directory,
            name=name,
            weights=weights,
            optimizer=optimizer,
            scheduler=scheduler,
            rng=rng,
            state=position.to_state(),
            metadata=self.metadata,
            keep_last=self.settings.keep_last,
        )

    def read(self, expected: RunPosition) -> tuple[RunPosition, Checkpoint] | None:
        """The newest checkpoint and the position it holds (None: there is none yet); a
        `TrainingError` when it was written for another config or stage plan than the run
        starting at `expected`."""
        checkpoint = load_checkpoint(self.directory)
        if checkpoint is None:
            return None
        if checkpoint.state["config_hash"] != expected.config_hash:
            raise TrainingError(
                f"the checkpoint in {checkpoint.path} belongs to another config "
                f"(hash {checkpoint.state['config_hash']}, this run {expected.config_hash}); "
                f"use a fresh checkpoint directory or resume=False"
            )
        position = RunPosition.from_state(checkpoint.state)
        if position.plan != expected.plan:
            raise TrainingError(
                f"the checkpoint in {checkpoint.path} was written for a different stage plan "
                f"(another rack?); use a fresh checkpoint directory or resume=False"
            )
        return replace(position, interrupted=False), checkpoint
