"""Which experiments a comparison names: experiment files resolved as `stackwise run` resolves
them now, or MLflow experiment names, and the identity each grid point of a file has now."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stackwise.tracking.compare.common import CompareError
from stackwise.tracking.logger import run_destination
from stackwise.tracking.store import resolve_tracking_uri

if TYPE_CHECKING:
    from stackwise.config.experiment import RunSpec


@dataclass
class ExperimentRef:
    """An experiment to compare: its MLflow name, the store it lives in and, when it was named
    by a file, the file's grid points as resolved now (grid order)."""

    name: str
    tracking_uri: str
    specs: list[RunSpec] | None = None


def resolve_experiments(
    items: Sequence[str],
    tracking_uri: str | None = None,
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
) -> list[ExperimentRef]:
    """Experiment files or names -> MLflow experiment names, stores and current grid points.

    An item that is an existing file (or ends in .yaml/.yml) is loaded and expanded exactly as
    `stackwise run` would (with `overrides` and `only`): each grid point goes with its
    experiment (``tracking.experiment_name`` or the file's ``name``) and store
    (``tracking.uri``). Anything else is an MLflow experiment name. Raises `ConfigError` for a
    bad file.
    """
    from stackwise.config.experiment import expand_grid, load_experiment

    files = [i for i in items if Path(i).is_file() or i.endswith((".yaml", ".yml"))]
    if (overrides or only) and not files:
        flag = "--set" if overrides else "--only"
        raise CompareError(
            f"{flag} resolves an experiment file as `stackwise run` would; {items[0]!r} is an "
            "experiment name: give its file instead"
        )
    refs: dict[tuple[str, str], ExperimentRef] = {}
    for item in items:
        if item not in files:
            key = (item, resolve_tracking_uri(tracking_uri))
            refs.setdefault(key, ExperimentRef(*key))
            continue
        experiment = load_experiment(item)
        specs = expand_grid(experiment, overrides, only, strict_only=len(files) == 1)
        if not specs:
            # The file's experiment is still named: notes and --all can speak of it.
            key = (experiment.config.name, resolve_tracking_uri(tracking_uri))
            refs.setdefault(key, ExperimentRef(*key, specs=[]))
        for spec in specs:
            key = run_destination(spec, tracking_uri)
            ref = refs.setdefault(key, ExperimentRef(*key, specs=[]))
            if ref.specs is None:  # named directly too: the file's settings decide
                ref.specs = []
            ref.specs.append(spec)
    if only and files and not any(ref.specs for ref in refs.values()):
        raise CompareError(f"--only {' --only '.join(only)}: no run of the given files matches")
    return list(refs.values())


def current_identity(spec: RunSpec, fingerprints: dict[str, str] | None = None) -> str:
    """The identity (``config_hash`` tag) `stackwise run` gives this grid point on this machine
    now, composed as `stackwise.runner.point_of` composes it: the config with `data.paths`
    resolved against the file's folder, the content of the data, and the device type.

    Raises `CompareError` when the data files are gone (the identity needs their content).
    Nothing is written: data files are hashed without the runner's fingerprint cache, once per
    data config when `fingerprints` (data config JSON -> fingerprint) is shared between calls.
    """
    from stackwise.identity import data_fingerprint, resolve_data_paths, run_identity

    config = resolve_data_paths(spec.config, Path(spec.file).resolve().parent)
    memo = {} if fingerprints is None else fingerprints
    key = config.data.model_dump_json()
    if key not in memo:
        try:
            memo[key] = data_fingerprint(config.data)
        except OSError as error:
            raise CompareError(
                f"{spec.file}: {spec.name}: cannot tell its current runs without its data ({error})"
            ) from error
    return run_identity(config, _device_type(config.training.device), memo[key])


def _device_type(name: str) -> str:
    """The device type a `training.device` value trains on here (`auto` resolved). torch is
    imported only to resolve `auto` where an accelerator may exist (macOS, or a Linux machine
    with NVIDIA or ROCm device files): without them `auto` is the CPU."""
    if name != "auto":
        return name.split(":")[0]  # validated by the config: cpu, cuda[:N], mps
    accelerators = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")
    if sys.platform != "darwin" and not any(Path(p).exists() for p in accelerators):
        return "cpu"
    from stackwise.training.device import resolve_device

    return resolve_device(name).type
