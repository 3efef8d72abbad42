"""What must be true before a grid runs, checked before anything is trained or written.

`load_plans` is what `stackwise validate`, `plan` and `run` start with: the files named on the
command line (globs expanded, each file once), each loaded and its grid expanded with ``--set``
and ``--only``, and then, over every run of every file that loaded, the checks that need no
tracking store:

- no two files log into one MLflow experiment (`shared_names`);
- every file of ``data.paths`` exists (`missing_data_files`, the data loader's rule without
  importing it);
- every run fits its device's memory, when asked (`memory_problems`, the estimates of
  `stackwise.training.limits`);
- every depth-wise run's sample pool fits the disk its activation cache may spill to
  (`cache_disk_problems`);
- every run's data has text, enough for one sequence of ``training.seq_len`` tokens on each
  side of the train/validation/test split, and its budget does not go over the training data
  more than `MAX_EPOCHS` times (`data_problems`: a warning, an error with ``strict``), each
  data config measured once by `stackwise.data.sizes` (file sizes; nothing is tokenized).

Before training, `stackwise run` (and `plan`) also check that each run's device exists here
(`check_devices`) and that every tracking store the runs write to can be used
(`check_stores`); `stackwise plan` shows every run's estimate (`run_estimates`). Every problem
is a `ConfigError` naming the file, line and dotted field; all problems of all files are
reported together. torch is imported only where a check needs it, so ``stackwise validate``
stays fast.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stackwise.config.base import DataConfig, StackWiseConfig
    from stackwise.config.errors import ConfigError
    from stackwise.config.experiment import Experiment, RunSpec
    from stackwise.data.sizes import CorpusSize
    from stackwise.training.plan import RunEstimate

Plans = list[tuple["Experiment", list["RunSpec"]]]


def expand_paths(patterns: Sequence[str], errors: list[ConfigError] | None = None) -> list[str]:
    """Files named on the command line; globs are expanded here too (for quoted patterns and
    shells that do not expand them). A glob that matches nothing is an error: raised, or added
    to `errors` when given (so the files that do exist are still checked)."""
    from stackwise.config.errors import ConfigError

    collected: list[ConfigError] = [] if errors is None else errors
    found: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                collected.append(ConfigError("no file matches this pattern", file=pattern))
            found.extend(matches)
        else:
            found.append(pattern)
    if errors is None and collected:
        raise ConfigError.combine(collected)
    # One file named twice (`a.yaml ./a.yaml`, or by a glob and by name) runs once.
    unique: dict[Path | str, str] = {}
    for path in found:
        try:
            key: Path | str = Path(path).resolve()
        except OSError:
            key = path
        unique.setdefault(key, path)
    return list(unique.values())


def load_plans(
    patterns: Sequence[str],
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
    max_runs: int | None = None,
    memory_check: bool = False,
    notes: list[str] | None = None,
    strict: bool = False,
    warnings: list[ConfigError] | None = None,
) -> Plans:
    """Load and fully validate every file (all errors of all files together), expanding grids
    with `overrides` (``--set``) and `only` (``--only``): every file loads, every run is valid,
    no two files share an experiment name, every data file exists, every depth-wise run's
    sample pool fits its cache's disk; a grid over `max_runs` points (default: `MAX_RUNS`) is
    an error, and with `memory_check` so is a run that cannot fit its device's memory. Data
    without text, or too short to split, is an error; a budget over `MAX_EPOCHS` passes over
    its training data is added to `warnings`, and is an error with `strict`.

    Raises `ConfigError` with every problem found. Notes about merged duplicate runs are added
    to `notes` once the files are valid (also when no run matches `only`, which is then
    raised)."""
    from stackwise.config.errors import ConfigError
    from stackwise.config.experiment import MAX_RUNS, expand_grid, load_experiment, only_problems

    errors: list[ConfigError] = []
    paths = expand_paths(patterns, errors)
    # With several files an `--only` filter may belong to some of them only (a value of an
    # axis that one file has); it is a mistake when no file knows it.
    several = len(paths) > 1
    plans: Plans = []
    found_notes: list[str] = []
    unknown: dict[str, list[ConfigError]] = {text: [] for text in only}
    for path in paths:
        try:
            experiment = load_experiment(path)
            if several:
                for text, problem in only_problems(experiment, only).items():
                    unknown[text].append(problem)
            runs = expand_grid(
                experiment,
                overrides,
                only,
                notes=found_notes,
                strict_only=not several,
                max_runs=MAX_RUNS if max_runs is None else max_runs,
            )
            plans.append((experiment, runs))
        except ConfigError as error:
            errors.append(error)
    errors.extend(shared_names(plans))
    if several and not errors:
        for problems in unknown.values():
            if len(problems) == len(plans):
                errors.extend(problems)
    missing = missing_data_files(plans)  # of the files that loaded
    errors.extend(missing)
    if memory_check:  # for the files that loaded, also when others did not
        # The vocabulary of a tokenizer file sizes the model: without the file, no estimate.
        unsized = {e.file for e in missing if e.field == "data.tokenizer_file"}
        errors.extend(memory_problems([(e, r) for e, r in plans if e.file not in unsized]))
    errors.extend(cache_disk_problems(plans))
    data_errors, repeats = data_problems(plans)
    errors.extend(data_errors)
    if strict:
        errors.extend(
            ConfigError(
                f"{r.message} (an error with --strict)", file=r.file, field=r.field, line=r.line
            )
            for r in repeats
        )
    if warnings is not None and not strict:
        warnings.extend(repeats)
    if errors:
        raise ConfigError.combine(errors)
    if notes is not None:
        notes.extend(found_notes)
    if only and not any(runs for _, runs in plans):
        raise ConfigError(f"--only {' --only '.join(only)}: no run of the given files matches")
    return plans


def shared_names(plans: Plans) -> list[ConfigError]:
    """Two files with the same experiment `name` would log indistinguishable runs into one
    MLflow experiment: an error naming both files."""
    from stackwise.config.errors import ConfigError

    first: dict[str, Experiment] = {}
    errors: list[ConfigError] = []
    for experiment, _ in plans:
        other = first.setdefault(experiment.name, experiment)
        if other is experiment:
            continue
        errors.append(
            ConfigError(
                f"{experiment.name!r} is also the name of {other.file}; both would log into one "
                f"MLflow experiment, their runs indistinguishable; give each file its own name",
                file=experiment.file,
                field="name",
                line=experiment.line_of(("name",)),
            )
        )
    return errors


def missing_data_files(plans: Plans) -> list[ConfigError]:
    """`data.paths` entries that name no file (for `source: files`) and a `data.tokenizer_file`
    that is no file, as errors.

    The same rule as the data loader (`stackwise.data.sources.expand_paths`: a path must be a
    file, a glob must match one; relative to the experiment file's folder), checked here without
    importing the data package (it needs torch) so that `validate` stays fast.
    """
    from stackwise.config.errors import ConfigError
    from stackwise.config.experiment import setting_line
    from stackwise.identity import resolve_data_pattern

    errors: list[ConfigError] = []
    seen: set[tuple[str, str]] = set()
    for experiment, runs in plans:
        for spec in runs:
            data = spec.config.data
            file = data.tokenizer_file
            if file is not None and (experiment.file, file) not in seen:
                seen.add((experiment.file, file))
                if not Path(resolve_data_pattern(file, experiment.path.resolve().parent)).is_file():
                    line = setting_line(experiment, spec, ("data", "tokenizer_file"))
                    message = f"{file!r} does not exist or is not a file (a tokenizer.json)"
                    errors.append(
                        ConfigError(
                            message, file=experiment.file, field="data.tokenizer_file", line=line
                        )
                    )
            if data.source != "files":
                continue
            for index, pattern in enumerate(data.paths):
                if (experiment.file, pattern) in seen:
                    continue
                seen.add((experiment.file, pattern))
                # Relative to the experiment file's folder, as the runner reads them.
                expanded = resolve_data_pattern(pattern, experiment.path.resolve().parent)
                if glob.has_magic(expanded):
                    matches = glob.glob(expanded, recursive=True)
                    if not any(Path(m).is_file() for m in matches):
                        message = f"no file matches {pattern!r}"
                    else:
                        continue
                elif Path(expanded).is_file() or (Path(expanded) / "state.json").is_file():
                    continue  # a file, or a folder saved with datasets' save_to_disk
                else:
                    message = f"{pattern!r} does not exist or is not a file"
                line = setting_line(experiment, spec, ("data", "paths", index))
                errors.append(
                    ConfigError(message, file=experiment.file, field="data.paths", line=line)
                )
    return errors


#: Passes over its training data above which a run's budget is reported before it starts (a
#: warning; an error with ``--strict``). Up to about 4 epochs repeated text trains nearly as
#: well as new text, and past about 16 it adds almost nothing (Muennighoff et al. 2023,
#: "Scaling Data-Constrained Language Models"); `stackwise report` flags results past 4. A
#: budget more than 10 times its data is most likely a mistake in the file (too little data,
#: or too many steps) rather than a study of repetition.
MAX_EPOCHS = 10


def _data_label(data: DataConfig) -> str:
    """The data as the user wrote it: its files (a few), or the corpus's name."""
    if data.source != "files":
        return f"the {data.source} corpus"
    shown = ", ".join(data.paths[:3])
    return shown + (f" (+{len(data.paths) - 3} more)" if len(data.paths) > 3 else "")


def _runs_label(specs: Sequence[RunSpec], count: int) -> str:
    """'' for the only run of a file; else which of its `count` runs a problem is about (run
    names hold commas: they are set apart by semicolons)."""
    if count == 1:
        return ""
    if len(specs) == count:
        return f" (all {count} runs)"
    if len(specs) == 1:
        return f" (run {specs[0].name})"
    names = "; ".join(spec.name for spec in specs[:3])
    more = f"; {len(specs) - 3} more" if len(specs) > 3 else ""
    return f" ({len(specs)} runs: {names}{more})"


def _budget_tokens(config: StackWiseConfig) -> tuple[int, str] | None:
    """(training tokens, where they come from) of a run's budget; None when a FLOPs budget
    cannot be planned. Steps and tokens need no torch; FLOPs need the run's stage plan (its
    rack built on the meta device, as `plan` does)."""
    training = config.training
    budget = training.budget
    per_step = training.batch_size * training.grad_accum_steps * training.seq_len
    if budget.steps is not None:
        return budget.steps * per_step, f"{budget.steps:,} steps of {per_step:,} tokens"
    if budget.tokens is not None:
        return max(1, round(budget.tokens / per_step)) * per_step, f"{budget.tokens:,} tokens"
    from stackwise.training.memory import (
        MAX_PLANNED_BLOCKS,
        MAX_PLANNED_PARAMETERS,
        parameter_count,
        skeleton,
    )
    from stackwise.training.stages import plan_stages

    if (
        config.model.n_blocks > MAX_PLANNED_BLOCKS
        or parameter_count(config) > MAX_PLANNED_PARAMETERS
    ):
        return None
    try:
        steps = sum(stage.steps for stage in plan_stages(config, skeleton(config)))
    except Exception:  # a run whose stages cannot be planned: the run itself says why
        return None
    return (
        steps * per_step,
        f"{budget.flops:.3g} FLOPs, about {steps:,} steps of {per_step:,} tokens",
    )


def _measure(data: DataConfig) -> CorpusSize | tuple[str, str] | None:
    """`stackwise.data.sizes.corpus_size` of `data` (paths resolved); what the loader would
    refuse as (field, message); None when a file is missing (`missing_data_files` says so)."""
    from stackwise.data.sizes import corpus_size

    try:
        return corpus_size(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        field, _, message = str(error).partition(": ")
        if not field.startswith("data."):
            field, message = "data.paths", str(error)
        return field, message


def _split(data: DataConfig, seq_len: int, size: CorpusSize) -> int | str:
    """The training tokens of the split the run will make (`stackwise.data.packing.
    split_lengths`: the runtime's own, on lengths), or why it cannot give every side one
    sequence of `seq_len` tokens."""
    from stackwise.data.packing import packed_rows, split_lengths

    try:
        split = split_lengths(
            size.lengths,
            val_fraction=data.val_fraction,
            seq_len=seq_len,
            seed=data.split_seed,
            max_tokens=data.max_tokens,
            test_fraction=data.test_fraction,
        )
    except ValueError as error:
        return str(error).removeprefix("data: ")
    return packed_rows(split.train, seq_len) * seq_len


def _prepared_problem(data: DataConfig, seq_len: int) -> tuple[str, str] | None:
    """(field, message) when a prepared folder cannot be trained on: no readable manifest, a
    shard that does not match it, or a side shorter than one sequence of `seq_len` tokens."""
    from stackwise.data.prepared import read_manifest

    try:
        manifest = read_manifest(data.paths[0])
    except ValueError as error:
        field, _, message = str(error).partition(": ")
        return field, message
    for name, side in manifest["sides"].items():
        if side["tokens"] < seq_len:
            return "training.seq_len", (
                f"the prepared {name} side of {data.paths[0]} holds {side['tokens']:,} tokens, "
                f"fewer than one sequence of {seq_len}; lower training.seq_len or prepare more text"
            )
    return None


def _report(
    found: dict[tuple[Any, ...], tuple[tuple[str, ...], str, list[RunSpec]]],
    kind: tuple[Any, ...],
    path: tuple[str, ...],
    message: str,
    spec: RunSpec,
) -> None:
    """Add run `spec` to the group `kind` of `found` (made with `path` and `message`)."""
    found.setdefault(kind, (path, message, []))[2].append(spec)


def data_problems(plans: Plans) -> tuple[list[ConfigError], list[ConfigError]]:
    """What each run's data allows: (errors, warnings).

    Errors: data the loader cannot read, data without text, and data too short for one
    sequence of ``training.seq_len`` tokens on each side of the train/validation/test split.
    Warnings: a budget that goes over the training data more than `MAX_EPOCHS` times. Each
    data config is measured once (`stackwise.data.sizes.corpus_size`: file sizes, or the text
    of a small corpus; nothing is tokenized), its split drawn only where its bounds
    (`stackwise.data.sizes.training_tokens`) leave the answer open, and each problem is
    reported once per file, for the runs it concerns. Counts are UTF-8 bytes, the byte
    tokenizer's tokens; a BPE run splits its text by bytes too (so a split that fails here
    fails there) but has fewer tokens than bytes, so its epochs here are a lower bound. Missing
    files are left to `missing_data_files`.
    """
    from stackwise.config.errors import ConfigError
    from stackwise.config.experiment import setting_line
    from stackwise.data.sizes import training_tokens
    from stackwise.identity import resolve_data_paths

    measured: dict[str, CorpusSize | tuple[str, str] | None] = {}  # by data config
    splits: dict[tuple[str, int], int | str] = {}  # by data config and seq_len
    budgets: dict[str, tuple[int, str] | None] = {}  # by `estimate_key`
    errors: list[ConfigError] = []
    warnings: list[ConfigError] = []
    for experiment, runs in plans:
        base = experiment.path.resolve().parent
        # (kind, what decides it) -> (field path, message, its runs): one report per group
        found: dict[tuple[Any, ...], tuple[tuple[str, ...], str, list[RunSpec]]] = {}
        report = functools.partial(_report, found)
        for spec in runs:
            data = resolve_data_paths(spec.config, base).data
            if data.source == "prepared":
                unusable = _prepared_problem(data, spec.config.training.seq_len)
                if unusable is not None:
                    field, message = unusable
                    report(("prepared", field, message), tuple(field.split(".")), message, spec)
                    continue
                seq_len = spec.config.training.seq_len
                tokens = _prepared_train_rows(data, seq_len) * seq_len  # the manifest's count
                estimate = estimate_key(spec.config)
                if estimate not in budgets:
                    budgets[estimate] = _budget_tokens(spec.config)
                budget = budgets[estimate]
                if budget is not None and _over(budget, tokens):  # tokens exact: no bounds
                    spent, described = budget
                    label = f"the prepared folder {spec.config.data.paths[0]}"
                    message = _epochs_message(described, spent, tokens, label, "tokens", "", False)
                    group = ("epochs", data.paths[0], seq_len, spent)
                    report(group, _budget_field(spec), message, spec)
                continue
            key = json.dumps(data.to_dict(), sort_keys=True)
            if key not in measured:
                measured[key] = _measure(data)
            size = measured[key]
            if size is None:
                continue
            if isinstance(size, tuple):
                field, message = size
                report(("read", key), tuple(field.split(".")), message, spec)
                continue
            label = _data_label(spec.config.data)
            limited = data.max_tokens is not None and (
                sum(n + 1 for n in size.lengths) + size.unread_bytes > data.max_tokens
            )
            if limited:
                label += f" cut to data.max_tokens={data.max_tokens:,}"
            if not size.lengths and not size.unread_bytes:
                empty = ["empty or only whitespace"] if "text" in size.formats else []
                if size.formats - {"text"}:
                    empty.append(f"no non-empty value in the column {data.text_column!r}")
                message = f"{label}: no text to train on ({' / '.join(empty)})"
                report(("empty", key), ("data", "paths"), message, spec)
                continue
            seq_len = spec.config.training.seq_len
            bounds = training_tokens(size, data, seq_len)
            if bounds is None:  # only the split can tell whether every side gets a sequence
                if (key, seq_len) not in splits:
                    splits[key, seq_len] = _split(data, seq_len, size)
                train = splits[key, seq_len]
                if isinstance(train, str):
                    message = f"{label}: {train}"
                    if data.tokenizer != "byte":
                        message += (
                            " (a run with a BPE or tokenizer file splits its text by UTF-8 "
                            "bytes, counted here)"
                        )
                    if limited:
                        path: tuple[str, ...] = ("data", "max_tokens")
                    elif data.source == "files":
                        path = ("data", "paths")
                    else:
                        path = ("training", "seq_len")
                    report(("short", key, seq_len), path, message, spec)
                    continue
                low = high = train
            else:
                low, high = bounds.low, bounds.high
            estimate = estimate_key(spec.config)
            if estimate not in budgets:
                budgets[estimate] = _budget_tokens(spec.config)
            budget = budgets[estimate]
            if budget is None or not _over(budget, low):
                continue  # within the limit, whatever the split
            spent, described = budget
            upper = bounds is not None and bounds.upper
            if upper:
                tokens = high
            else:
                if low != high:  # the bounds leave it open: draw the split
                    if (key, seq_len) not in splits:
                        splits[key, seq_len] = _split(data, seq_len, size)
                    split = splits[key, seq_len]
                    assert isinstance(split, int)  # the bounds hold only for splits that work
                    low = high = split
                tokens = high
            if not _over(budget, tokens):
                continue
            unit = "bytes" if data.tokenizer != "byte" else "tokens"
            at_least = "at least " if upper or data.tokenizer != "byte" else ""
            message = _epochs_message(described, spent, tokens, label, unit, at_least, upper)
            report(("epochs", key, seq_len, spent), _budget_field(spec), message, spec)
        for (kind, *_), (path, message, specs) in found.items():
            problem = ConfigError(
                message + _runs_label(specs, len(runs)),
                file=experiment.file,
                field=".".join(path),
                line=setting_line(experiment, specs[0], path),
            )
            (warnings if kind == "epochs" else errors).append(problem)
    return errors, warnings


def _over(budget: tuple[int, str], tokens: int) -> bool:
    """Whether a budget of (tokens, description) goes over `tokens` more than `MAX_EPOCHS`
    times."""
    return budget[0] > MAX_EPOCHS * max(tokens, 1)


def _epochs_message(
    described: str, spent: int, tokens: int, label: str, unit: str, at_least: str, upper: bool
) -> str:
    return (
        f"the budget ({described}) goes over the training data {at_least}"
        f"{spent / max(tokens, 1):,.1f} times, more than {MAX_EPOCHS} epochs: {label} "
        f"gives {'at most ' if upper else ''}{tokens:,} training {unit}; add data or "
        f"lower the budget"
    )


def _budget_field(spec: RunSpec) -> tuple[str, ...]:
    given = spec.config.training.budget
    name = "steps" if given.steps is not None else "tokens" if given.tokens else "flops"
    return ("training", "budget", name)


def _prepared_train_rows(data: DataConfig, seq_len: int) -> int:
    """Training rows of `seq_len` tokens of a prepared folder (one `_prepared_problem` found
    usable)."""
    from stackwise.data.prepared import read_manifest

    return int(read_manifest(data.paths[0])["sides"]["train"]["tokens"]) // seq_len


def check_devices(plans: Plans) -> None:
    """Every run's `training.device` exists on this machine (`cuda` without a GPU is a mistake
    in the input, reported before anything runs). Raises `ConfigError`."""
    from stackwise.config.errors import ConfigError

    names = {spec.config.training.device for _, runs in plans for spec in runs}
    if names <= {"auto", "cpu"}:
        return  # always available; no need to import torch
    from stackwise.training.device import resolve_device

    unavailable: dict[str, str] = {}
    for name in sorted(names):
        try:
            resolve_device(name)
        except (RuntimeError, ValueError) as error:
            unavailable[name] = str(error).removeprefix(f"training.device is {name!r} but ")
    errors = [
        ConfigError(
            f"{spec.config.training.device!r} is not available here: "
            f"{unavailable[spec.config.training.device]}",
            file=experiment.file,
            field="training.device",
        )
        for experiment, runs in plans
        for spec in runs
        if spec.config.training.device in unavailable
    ]
    if errors:
        raise ConfigError.combine(errors)


def estimate_key(config: StackWiseConfig) -> str:
    """What a run's estimates (parameters, steps, FLOPs, memory, disk) depend on: its identity
    settings without the seed and the learning rate, so replicate seeds and a learning-rate
    sweep of one grid point are estimated once."""
    settings = config.identity_dict()
    training = settings.get("training", {})
    training.pop("seed", None)
    optimizer = training.get("optimizer")
    if isinstance(optimizer, dict):
        optimizer.pop("lr", None)
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def _each_once(
    plans: Plans, compute: Callable[[StackWiseConfig], Any]
) -> Iterator[tuple[Experiment, RunSpec, Any]]:
    """(experiment, run, `compute` of its config) for every run; runs of identical config but
    for seed and learning rate are computed once (`estimate_key`)."""
    from stackwise.identity import resolve_data_paths

    found: dict[str, Any] = {}
    for experiment, runs in plans:
        base = experiment.path.resolve().parent
        for spec in runs:
            # Paths as the run reads them (a tokenizer file's vocabulary sizes the model).
            config = resolve_data_paths(spec.config, base)
            key = estimate_key(config)
            if key not in found:
                found[key] = compute(config)
            yield experiment, spec, found[key]


def _problems_once(
    plans: Plans, check: Callable[[StackWiseConfig], Any]
) -> Iterator[tuple[Experiment, RunSpec, Any]]:
    """(experiment, run, problem) for every run whose `check` finds one; runs of identical
    config but for seed and learning rate are checked once (`estimate_key`)."""
    return ((e, spec, p) for e, spec, p in _each_once(plans, check) if p is not None)


def run_estimates(plans: Plans) -> Iterator[tuple[Experiment, RunSpec, RunEstimate]]:
    """Every run with its estimate (`stackwise.training.plan.estimate_run`: parameters and
    steps per stage, FLOPs, memory, device; what it cannot estimate is its `note`, it never
    raises), in plan order; runs of identical config but for seed and learning rate share one
    estimate, made once."""
    from stackwise.training.plan import estimate_run

    return _each_once(plans, estimate_run)


def memory_problems(plans: Plans) -> list[ConfigError]:
    """Runs that cannot fit the memory of their device (estimated parameters and peak memory,
    see `stackwise.training.limits`), as errors naming the setting and the estimate."""
    from stackwise.config.errors import ConfigError
    from stackwise.config.experiment import setting_line
    from stackwise.training.limits import check_run_memory

    return [
        ConfigError(
            f"run {spec.name} {problem.message}",
            file=experiment.file,
            field=problem.field,
            line=setting_line(experiment, spec, tuple(problem.field.split("."))),
        )
        for experiment, spec, problem in _problems_once(plans, check_run_memory)
    ]


def cache_disk_problems(plans: Plans) -> list[ConfigError]:
    """Depth-wise runs whose sample pool does not fit the disk its activation cache may spill
    to (`training.cache.max_disk_gb`, default half the free disk; see
    `stackwise.training.disk_budget`), as errors."""
    from stackwise.config.errors import ConfigError
    from stackwise.config.experiment import setting_line
    from stackwise.training.disk_budget import pool_disk_problem

    path = ("training", "cache", "max_disk_gb")
    return [
        ConfigError(
            f"run {spec.name}: {problem}",
            file=experiment.file,
            field=".".join(path),
            line=setting_line(experiment, spec, path),
        )
        for experiment, spec, problem in _problems_once(plans, pool_disk_problem)
    ]


def check_stores(plans: Plans, cli_uri: str | None) -> None:
    """Every tracking store the runs would write to can be used (known scheme, server
    reachable), checked before anything is trained or written. Raises `ConfigError`."""
    from stackwise.config.errors import ConfigError
    from stackwise.tracking.logger import run_destination
    from stackwise.tracking.store import check_tracking_uri

    checked: dict[str, str | None] = {}
    errors: list[ConfigError] = []
    for experiment, runs in plans:
        for spec in runs:
            uri = run_destination(spec, cli_uri).uri
            if uri in checked:
                continue
            checked[uri] = problem = check_tracking_uri(uri)
            if problem is None:
                continue
            # Name where the URI came from (same precedence as resolve_tracking_uri).
            if cli_uri and cli_uri.strip():
                errors.append(ConfigError(problem, field="--tracking-uri"))
            elif os.environ.get("MLFLOW_TRACKING_URI", "").strip():
                errors.append(ConfigError(problem, field="MLFLOW_TRACKING_URI"))
            elif spec.config.tracking.uri:
                errors.append(ConfigError(problem, file=experiment.file, field="tracking.uri"))
            else:
                errors.append(ConfigError(problem))
    if errors:
        raise ConfigError.combine(errors)
