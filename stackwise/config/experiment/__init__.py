"""Experiment files: a base run config, named presets and a grid of runs.

An experiment file (``experiments/*.yaml``) looks like this::

    name: size_vs_mode                 # safe identifier; also the MLflow experiment name
    description: Depth-wise vs end-to-end training at three sizes.
    schema_version: 1
    model: {attention_type: mha}       # the base run config: the sections of StackWiseConfig
    training: {budget: {steps: 200}}
    presets:                           # optional: named bundles of settings, per preset axis
      size:
        tiny: {model.d_model: 32, model: {architecture: {n_stacks: 1}}}
    grid:                              # each point of the product is one run
      size: [tiny, small]              # a preset axis (built-in size presets: small/medium/large)
      training.training_architecture: [layerwise, stackwise, rackwise]   # a setting axis
    zip: []                            # optional: groups of axes that vary together
    exclude:                           # optional: grid points to skip
      - {size: tiny, mode: rackwise}
    tune:                              # optional: every grid point runs for every value
      training.optimizer.lr: [1.0e-3, 3.0e-3]
    seeds: [0, 1, 2]                   # optional: replicates of every run

Seeds and tuned settings multiply the runs without being grid coordinates: ``seeds`` runs every
grid point once per seed (``training.seed``: initialisation and data order; the data split
does not depend on it, see ``data.split_seed``), ``tune`` once per value of each tuned setting.
A run's name lists its grid coordinates, then its tuned values, then ``seed=N``
(``mode=rackwise,lr=0.003,seed=1``); `RunSpec.coordinates` holds the grid coordinates only, and
`stackwise compare` averages over seeds and picks each grid point's best tuned value on
validation loss.

Each run's config is built in a fixed order — the base sections, then each axis in the order the
grid lists them (a preset's settings or the axis value), then ``--set`` overrides — and then
validated as a `StackWiseConfig`. The whole grid is validated before anything runs, and every
problem is reported with the file, the dotted field and (where known) the line that set it.

Identity: a run is its fully resolved config, identified by `StackWiseConfig.config_hash()`.
Two grid points that resolve to the same config (e.g. after ``--set`` pins an axis) are run
once: the later ones are dropped and a note says so.

The package's parts: `schema` (the file's fields, built-in presets), `settings` (one setting
and where it was written; a run's settings resolved into a config tree), `spec` (a loaded
experiment, its axes and runs), `naming` (axis short names, value labels, run names), `load`
(`load_experiment`: the file checked), `grid` (zip groups, exclusions and the grid points),
`overrides` (``--set``), `filters` (``--only``), `expand` (`expand_grid`: every run resolved,
validated and named) and `json_schema` (the schema files for editors).
"""

from stackwise.config.experiment.expand import expand_grid, setting_line
from stackwise.config.experiment.filters import only_problems
from stackwise.config.experiment.grid import (
    MAX_RUNS,
    check_grid_size,
    count_runs,
    grid_points,
    grid_size,
)
from stackwise.config.experiment.json_schema import (
    SCHEMA_FILES,
    experiment_json_schema,
    json_schema_texts,
    run_config_json_schema,
    stale_json_schemas,
    write_json_schemas,
)
from stackwise.config.experiment.load import load_experiment
from stackwise.config.experiment.naming import (
    AXIS_SHORT_NAMES,
    SEED_SETTING,
    SHORT_NAME_SETTINGS,
    value_label,
)
from stackwise.config.experiment.overrides import parse_override
from stackwise.config.experiment.schema import (
    BUILTIN_PRESETS,
    SECTIONS,
    ExperimentConfig,
    NonEmptyList,
)
from stackwise.config.experiment.settings import Assignment, Source
from stackwise.config.experiment.spec import Axis, Experiment, RunSpec

__all__ = [
    "AXIS_SHORT_NAMES",
    "BUILTIN_PRESETS",
    "MAX_RUNS",
    "SCHEMA_FILES",
    "SECTIONS",
    "SEED_SETTING",
    "SHORT_NAME_SETTINGS",
    "Assignment",
    "Axis",
    "Experiment",
    "ExperimentConfig",
    "NonEmptyList",
    "RunSpec",
    "Source",
    "check_grid_size",
    "count_runs",
    "expand_grid",
    "experiment_json_schema",
    "grid_points",
    "grid_size",
    "json_schema_texts",
    "load_experiment",
    "only_problems",
    "parse_override",
    "run_config_json_schema",
    "setting_line",
    "stale_json_schemas",
    "value_label",
    "write_json_schemas",
]
