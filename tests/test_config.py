"""Library-level tests of configuration: strict YAML loading, error messages, the run schema's
validation rules, and experiment files (presets, grid expansion, zip, exclude, overrides)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from stackwise.config.base import StackWiseConfig
from stackwise.config.errors import ConfigError, format_validation_error, validation_issues
from stackwise.config.experiment import (
    BUILTIN_PRESETS,
    ExperimentConfig,
    expand_grid,
    load_experiment,
    parse_override,
    stale_json_schemas,
    value_label,
)
from stackwise.config.loading import load_validated, load_yaml, parse_yaml

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def experiment_error(tmp_path: Path, text: str, *, overrides=(), only=()) -> ConfigError:
    """Load and expand `text`, expecting a ConfigError."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        expand_grid(load_experiment(path), overrides, only)
    return caught.value


# --------------------------------------------------------------------------------------------
# strict YAML loading
# --------------------------------------------------------------------------------------------


def test_yaml_records_line_of_every_key_and_item() -> None:
    document = parse_yaml(
        "name: x\nmodel:\n  d_model: 64\ngrid:\n  size:\n    - small\n    - large\n", file="f.yaml"
    )
    assert document.data["grid"]["size"] == ["small", "large"]
    assert document.lines[("model", "d_model")] == 3
    assert document.lines[("grid", "size", 1)] == 7
    # unknown descendants fall back to the nearest recorded ancestor
    assert document.line_of(("model", "d_model", "oops")) == 3


def test_duplicate_key_is_an_error_with_both_lines() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_yaml("model:\n  d_model: 64\n  n_heads: 4\n  d_model: 32\n", file="dup.yaml")
    error = caught.value
    assert (error.file, error.field, error.line) == ("dup.yaml", "model.d_model", 4)
    assert "first defined on line 2" in error.message


def test_same_key_in_different_mappings_and_merge_keys_are_allowed() -> None:
    text = "base: &b {lr: 1, wd: 2}\na: {lr: 3}\nb:\n  <<: *b\n  lr: 5\n"
    assert parse_yaml(text, file="ok.yaml").data == {
        "base": {"lr": 1, "wd": 2},
        "a": {"lr": 3},
        "b": {"lr": 5, "wd": 2},
    }


def test_malformed_yaml_reports_parser_line_and_column() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_yaml("a: 1\nb: [1, 2\nc: 3\n", file="bad.yaml")
    error = caught.value
    assert error.line == 3 and error.column is not None
    assert str(error).startswith("bad.yaml:3:")
    assert "invalid YAML" in error.message and "line 2" in error.message


def test_yaml_tags_are_never_instantiated() -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_yaml("a: !!python/object/apply:os.system ['true']\n", file="evil.yaml")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as caught:
        load_yaml(tmp_path / "nope.yaml")
    assert caught.value.file == str(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------------------------
# ConfigError and pydantic error formatting
# --------------------------------------------------------------------------------------------


def test_config_error_format_and_combine() -> None:
    one = ConfigError("bad", file="a.yaml", field="model.d_model", line=3)
    two = ConfigError("worse", file="a.yaml", field="training")
    assert str(one) == "a.yaml:3: model.d_model: bad"
    assert str(ConfigError("no such file", file="x.yaml")) == "x.yaml: no such file"
    both = ConfigError.combine([one, two, one])
    assert both.errors == [one, two]
    assert str(both).splitlines() == ["a.yaml:3: model.d_model: bad", "a.yaml: training: worse"]
    assert ConfigError.combine([one]) is one


def issues_of(data: dict) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        StackWiseConfig.model_validate(data)
    return {
        ".".join(map(str, i.path)): i.message
        for i in validation_issues(caught.value, StackWiseConfig)
    }


def test_cross_field_prefix_becomes_full_dotted_field() -> None:
    issues = issues_of({"model": {"d_model": 100, "n_heads": 8}})
    assert issues == {"model.n_heads": "d_model (100) must be divisible by n_heads (8)"}


def test_unknown_key_suggests_closest_field() -> None:
    issues = issues_of({"training": {"optimzer": {"lr": 1.0}}})
    assert issues == {"training.optimzer": "unknown field; did you mean 'optimizer'?"}


def test_unknown_key_without_close_match_lists_known_fields() -> None:
    message = issues_of({"data": {"zzzz": 1}})["data.zzzz"]
    assert message.startswith("unknown field; known fields: ") and "max_tokens" in message


def test_literal_error_lists_allowed_values() -> None:
    message = issues_of({"model": {"attention_type": "flash"}})["model.attention_type"]
    assert message == "got 'flash'; allowed values: 'mha', 'gqa', 'mla' or 'kernel'"


def test_several_errors_are_reported_together() -> None:
    issues = issues_of({"training": {"batch_size": "x", "seq_len": 0, "budget": {"steps": -1}}})
    assert set(issues) == {"training.batch_size", "training.seq_len", "training.budget.steps"}


def test_format_validation_error_adds_file_and_line() -> None:
    document = parse_yaml("model:\n  d_model: 100\n  n_heads: 8\n", file="run.yaml")
    with pytest.raises(ValidationError) as caught:
        StackWiseConfig.model_validate(document.data)
    error = format_validation_error(
        caught.value, StackWiseConfig, file="run.yaml", lines=document.lines
    )
    assert str(error) == "run.yaml:3: model.n_heads: d_model (100) must be divisible by n_heads (8)"


def test_load_validated_reads_plain_config(tmp_path: Path) -> None:
    good = write(tmp_path, "model: {d_model: 64, n_heads: 4}\n", "good.yaml")
    assert load_validated(good, StackWiseConfig).model.d_model == 64
    bad = write(tmp_path, "model:\n  n_head: 4\n", "bad.yaml")
    with pytest.raises(ConfigError, match="did you mean 'n_heads'") as caught:
        load_validated(bad, StackWiseConfig)
    assert caught.value.line == 2


# --------------------------------------------------------------------------------------------
# run schema rules (base.py) as users meet them
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"model": {"n_heads": 8, "n_kv_heads": 3}}, "model.n_kv_heads", "divisible"),
        ({"model": {"d_model": 24, "n_heads": 8}}, "model.n_heads", "even head dimension"),
        (
            {"model": {"attention_type": "mla", "mla": {"kv_lora_rank": 9999}}},
            "model.mla.kv_lora_rank",
            "at most d_model",
        ),
        (
            {"training": {"mask_ratio_min": 0.9, "mask_ratio_max": 0.2}},
            "training.mask_ratio_min",
            "must be less than",
        ),
        (
            {"training": {"mask_ratio_max": 1.5}},
            "training.mask_ratio_max",
            "less than or equal to 1",
        ),
        ({"training": {"budget": {"steps": 0}}}, "training.budget.steps", "greater than 0"),
        ({"training": {"budget": {"steps": 1, "tokens": 1}}}, "training.budget", "exactly one"),
        ({"model": {"attention_mode": "bidirectional"}}, "model.attention_mode", "causal"),
        ({"training": {"device": "tpu"}}, "training.device", "device must be"),
        (
            {"model": {"kernel": {"favor_sampling": "gaussian"}}},
            "model.kernel.favor_sampling",
            "'orthogonal', 'antithetic' or 'regularized'",
        ),
    ],
)
def test_schema_rules(data: dict, field: str, fragment: str) -> None:
    issues = issues_of(data)
    assert field in issues, issues
    assert fragment in issues[field]


def test_assignment_is_validated() -> None:
    config = StackWiseConfig()
    config.training.training_architecture = "layerwise"  # type: ignore[assignment]
    assert config.training.training_architecture == "blockwise"
    with pytest.raises(ValidationError):
        config.training.training_architecture = "depthwise"  # type: ignore[assignment]
    with pytest.raises(ValidationError):
        config.model.d_model = "wide"  # type: ignore[assignment]
    assert config.training.training_architecture == "blockwise"


# --------------------------------------------------------------------------------------------
# experiment files: grid expansion
# --------------------------------------------------------------------------------------------

SIZE_BY_MODE = """
name: demo
training:
  budget: {steps: 10}
grid:
  size: [small, medium]
  training.training_architecture: [layerwise, stackwise, rackwise]
"""


def test_grid_is_a_product_in_file_order_with_stable_names(tmp_path: Path) -> None:
    runs = expand_grid(load_experiment(write(tmp_path, SIZE_BY_MODE)))
    assert [r.name for r in runs] == [
        "size=small,mode=layerwise",
        "size=small,mode=stackwise",
        "size=small,mode=rackwise",
        "size=medium,mode=layerwise",
        "size=medium,mode=stackwise",
        "size=medium,mode=rackwise",
    ]
    # What MLflow shows: the mode first, words on their own.
    assert [r.title for r in runs[:2]] == ["layerwise · small", "stackwise · small"]
    first = runs[0]
    assert first.coordinates == {"size": "small", "mode": "layerwise"}
    assert list(first.coordinates) == ["size", "mode"]
    assert first.experiment_name == "demo"
    assert first.config.training.training_architecture == "blockwise"
    assert first.config.model.d_model == BUILTIN_PRESETS["size"]["small"]["model"]["d_model"]
    assert first.config.training.budget.steps == 10
    assert runs[3].config.model.architecture.blocks_per_stack == 3
    assert all(r.config_hash == r.config.config_hash() for r in runs)
    assert len({r.config_hash for r in runs}) == len(runs)


def test_display_names_keep_axis_names_beside_numbers_and_literals() -> None:
    from stackwise.config.experiment.spec import display_name

    labels = {"lr": "0.003", "mode": "rackwise", "use_rope": "false", "seed": "2"}
    assert display_name(labels) == "rackwise · lr=0.003 · use_rope=false · seed=2"
    assert display_name({"budget": "1.0e11", "attention": "mha"}) == "budget=1.0e11 · mha"
    assert display_name({"mix": '{"a":1}'}) == 'mix={"a":1}'
    assert display_name({}) == "default"


def test_hashes_are_deterministic_and_follow_the_resolved_config(tmp_path: Path) -> None:
    first = expand_grid(load_experiment(write(tmp_path, SIZE_BY_MODE, "a.yaml")))
    # Same runs written differently (nested vs dotted, other key order) -> same identities.
    other = """
    name: renamed
    training: {budget: {steps: 10}}
    presets:
      size:
        small: {model.n_heads: 4, model: {d_model: 64, architecture: {blocks_per_stack: 2}}}
    grid:
      size: [small]
      training.training_architecture: [layerwise]
    """
    second = expand_grid(load_experiment(write(tmp_path, other, "b.yaml")))
    assert second[0].config_hash == first[0].config_hash
    assert second[0].name == first[0].name


def test_no_grid_gives_one_default_run(tmp_path: Path) -> None:
    runs = expand_grid(load_experiment(write(tmp_path, "name: single\n")))
    assert [(r.name, r.coordinates) for r in runs] == [("default", {})]
    assert runs[0].config == StackWiseConfig()


def test_zip_pairs_values_instead_of_crossing(tmp_path: Path) -> None:
    text = """
    name: zipped
    grid:
      training.objective: [clm, mlm, diffusion]
      training.training_architecture: [stackwise, rackwise]
      model.attention_mode: [causal, bidirectional, bidirectional]
    zip:
      - [objective, model.attention_mode]
    """
    runs = expand_grid(load_experiment(write(tmp_path, text)))
    assert [r.name for r in runs] == [
        "objective=clm,mode=stackwise,attention_mode=causal",
        "objective=clm,mode=rackwise,attention_mode=causal",
        "objective=mlm,mode=stackwise,attention_mode=bidirectional",
        "objective=mlm,mode=rackwise,attention_mode=bidirectional",
        "objective=diffusion,mode=stackwise,attention_mode=bidirectional",
        "objective=diffusion,mode=rackwise,attention_mode=bidirectional",
    ]
    assert all(
        (r.config.training.objective == "clm") == (r.config.model.attention_mode == "causal")
        for r in runs
    )


def test_zip_errors(tmp_path: Path) -> None:
    error = experiment_error(
        tmp_path,
        """
        name: z
        grid:
          training.objective: [mlm, diffusion]
          training.seed: [1, 2, 3]
        zip: [[objective, sead]]
        """,
    )
    assert "'sead' is not a grid axis; did you mean 'seed'?" in str(error)


def test_exclude_skips_matching_points(tmp_path: Path) -> None:
    text = SIZE_BY_MODE + "exclude:\n  - {size: medium, mode: layerwise}\n  - {mode: stackwise}\n"
    runs = expand_grid(load_experiment(write(tmp_path, text)))
    assert [r.name for r in runs] == [
        "size=small,mode=layerwise",
        "size=small,mode=rackwise",
        "size=medium,mode=rackwise",
    ]


def test_exclude_must_name_real_axes_and_values(tmp_path: Path) -> None:
    error = experiment_error(
        tmp_path, SIZE_BY_MODE + "exclude:\n  - {sise: small}\n  - {mode: depthwise}\n"
    )
    messages = [e.format() for e in error.errors]
    assert any("exclude.0.sise" in m and "did you mean 'size'?" in m for m in messages)
    assert any(
        "exclude.1.mode" in m and "values: layerwise, stackwise, rackwise" in m for m in messages
    )


def test_exclude_that_removes_everything_is_an_error(tmp_path: Path) -> None:
    text = "name: e\ngrid:\n  training.seed: [1]\nexclude:\n  - {seed: 1}\n"
    assert "leaves no run" in str(experiment_error(tmp_path, text))


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------


def test_builtin_size_presets_are_valid_and_grow() -> None:
    sizes = []
    for name in ("small", "medium", "large"):
        config = StackWiseConfig.model_validate(BUILTIN_PRESETS["size"][name])
        sizes.append((config.model.d_model, config.model.n_blocks))
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    assert StackWiseConfig.model_validate(BUILTIN_PRESETS["size"]["small"]).model.n_blocks == 4


def test_file_preset_replaces_builtin_and_adds_new(tmp_path: Path) -> None:
    text = """
    name: p
    presets:
      size:
        small: {model: {d_model: 32, n_heads: 2}}
        tiny:
          model.d_model: 16
          model.n_heads: 2
          model.architecture: {n_stacks: 1, blocks_per_stack: 1}
    grid:
      size: [small, tiny, large]
    """
    runs = {r.name: r.config.model for r in expand_grid(load_experiment(write(tmp_path, text)))}
    assert runs["size=small"].d_model == 32
    # replaced, not merged: the built-in small's 2x2 blocks are not inherited
    assert (
        runs["size=small"].architecture.blocks_per_stack
        == StackWiseConfig().model.architecture.blocks_per_stack
    )
    assert (runs["size=tiny"].d_model, runs["size=tiny"].n_blocks) == (16, 1)
    assert runs["size=large"].d_model == BUILTIN_PRESETS["size"]["large"]["model"]["d_model"]


def test_custom_preset_axis_and_value_axis_override_order(tmp_path: Path) -> None:
    text = """
    name: p
    model: {n_heads: 4, d_model: 64}
    presets:
      attention:
        gqa: {model.attention_type: gqa, model.n_kv_heads: 2}
        mha: {model.attention_type: mha}
    grid:
      attention: [gqa, mha]
      model.n_kv_heads: [1]
    """
    runs = expand_grid(load_experiment(write(tmp_path, text)))
    assert [r.name for r in runs] == ["attention=gqa,n_kv_heads=1", "attention=mha,n_kv_heads=1"]
    # later axes win over earlier ones
    assert runs[0].config.model.n_kv_heads == 1
    assert runs[0].config.model.attention_type == "gqa"


def test_unknown_preset_lists_known_presets(tmp_path: Path) -> None:
    error = experiment_error(tmp_path, "name: p\ngrid:\n  size: [smal]\n")
    assert str(error) == (
        f"{tmp_path / 'exp.yaml'}:3: grid.size.0: unknown preset 'smal' for 'size'; "
        "did you mean 'small'? known presets: small, medium, large"
    )


# --------------------------------------------------------------------------------------------
# axes, names and errors located in the file
# --------------------------------------------------------------------------------------------


def test_axis_naming_missing_setting_is_an_error(tmp_path: Path) -> None:
    error = experiment_error(tmp_path, "name: a\ngrid:\n  training.optimizer.lrr: [1, 2]\n")
    assert error.field == "grid.training.optimizer.lrr" and error.line == 3
    assert "did you mean 'lr'?" in error.message


def test_axis_short_names_stay_unique(tmp_path: Path) -> None:
    text = """
    name: s
    training: {fusion: {enabled: true, steps: 5}}
    grid:
      training.optimizer.lr: [0.001]
      training.fusion.lr: [0.0001]
      training.seed: [0, 1]
    """
    runs = expand_grid(load_experiment(write(tmp_path, text)))
    assert list(runs[0].coordinates) == ["optimizer.lr", "fusion.lr", "seed"]
    assert runs[1].name == "optimizer.lr=0.001,fusion.lr=0.0001,seed=1"


def test_repeated_axis_value_is_an_error(tmp_path: Path) -> None:
    error = experiment_error(tmp_path, "name: r\ngrid:\n  training.seed: [1, 2, 1]\n")
    assert error.field == "grid.training.seed.2" and "listed twice" in error.message


def test_run_error_names_the_run_and_the_line_that_set_the_value(tmp_path: Path) -> None:
    text = """
    name: r
    model:
      d_model: 64
    grid:
      training.seed: [0, 1]
      model.n_heads:
        - 4
        - 5
    """
    error = experiment_error(tmp_path, text)
    assert error.field == "model.n_heads" and error.line == 8
    assert (
        error.message
        == "d_model (64) must be divisible by n_heads (5) (runs seed=0,n_heads=5; seed=1,n_heads=5)"
    )


def test_error_in_base_is_reported_once_for_all_runs(tmp_path: Path) -> None:
    text = SIZE_BY_MODE.replace("budget: {steps: 10}", "budget: {steps: 10}\n  batch_size: lots")
    error = experiment_error(tmp_path, text)
    assert len(error.errors) == 1
    assert error.field == "training.batch_size" and error.line == 4
    assert "(run" not in error.message


def test_experiment_name_must_be_safe(tmp_path: Path) -> None:
    error = experiment_error(tmp_path, "name: ../escape\n")
    assert error.field == "name" and "safe identifier" in error.message


def test_schema_version_is_checked(tmp_path: Path) -> None:
    error = experiment_error(tmp_path, "name: v\nschema_version: 2\n")
    assert error.field == "schema_version" and "allowed values: 1" in error.message


# --------------------------------------------------------------------------------------------
# --set and --only
# --------------------------------------------------------------------------------------------


def test_parse_override_reads_values_as_yaml() -> None:
    assert parse_override("training.budget.steps=50") == (("training", "budget", "steps"), 50)
    assert parse_override("data.paths=[a.txt, b.txt]")[1] == ["a.txt", "b.txt"]
    assert parse_override("model.n_kv_heads=null")[1] is None
    assert parse_override("tracking.experiment_name=a=b")[1] == "a=b"
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("training.seed")


def test_overrides_apply_to_every_run_after_the_grid(tmp_path: Path) -> None:
    experiment = load_experiment(write(tmp_path, SIZE_BY_MODE))
    runs = expand_grid(experiment, ["training.budget.steps=30", "model.n_heads=2"])
    assert len(runs) == 6
    assert {(r.config.training.budget.steps, r.config.model.n_heads) for r in runs} == {(30, 2)}


def test_override_pinning_an_axis_deduplicates_with_a_note(tmp_path: Path) -> None:
    experiment = load_experiment(write(tmp_path, SIZE_BY_MODE))
    notes: list[str] = []
    runs = expand_grid(experiment, ["training.training_architecture=rackwise"], notes=notes)
    assert [r.name for r in runs] == ["size=small,mode=layerwise", "size=medium,mode=layerwise"]
    assert len(notes) == 4 and "identical to run size=small,mode=layerwise" in notes[0]


def test_override_errors(tmp_path: Path) -> None:
    experiment = load_experiment(write(tmp_path, SIZE_BY_MODE))
    with pytest.raises(ConfigError) as caught:
        expand_grid(experiment, ["training.optimzer.lr=0.1", "training.seed=-1"])
    messages = [e.format() for e in caught.value.errors]
    assert messages == [
        "--set training.optimzer.lr=0.1: unknown field 'optimzer'; did you mean 'optimizer'?"
    ]
    with pytest.raises(ConfigError) as caught:
        expand_grid(experiment, ["training.seed=-1"])
    assert "training.seed" in str(caught.value) and "(from --set training.seed=-1)" in str(
        caught.value
    )


def test_only_filters_on_short_and_dotted_names(tmp_path: Path) -> None:
    experiment = load_experiment(write(tmp_path, SIZE_BY_MODE))
    names = [r.name for r in expand_grid(experiment, only=["mode=layerwise"])]
    assert names == ["size=small,mode=layerwise", "size=medium,mode=layerwise"]
    names = [
        r.name
        for r in expand_grid(
            experiment,
            only=["training.training_architecture=rackwise", "mode=stackwise", "size=medium"],
        )
    ]
    assert names == ["size=medium,mode=stackwise", "size=medium,mode=rackwise"]


def test_only_on_a_resolved_setting(tmp_path: Path) -> None:
    experiment = load_experiment(write(tmp_path, SIZE_BY_MODE))
    assert len(expand_grid(experiment, only=["training.objective=clm"])) == 6
    assert expand_grid(experiment, only=["training.objective=mlm"]) == []
    names = [r.name for r in expand_grid(experiment, only=["model.d_model=128"])]
    assert names == [
        "size=medium,mode=layerwise",
        "size=medium,mode=stackwise",
        "size=medium,mode=rackwise",
    ]


def test_only_errors(tmp_path: Path) -> None:
    experiment = load_experiment(write(tmp_path, SIZE_BY_MODE))
    with pytest.raises(ConfigError, match="'huge' is not a value of axis 'size'"):
        expand_grid(experiment, only=["size=huge"])
    with pytest.raises(ConfigError, match="did you mean 'mode'"):
        expand_grid(experiment, only=["mod=layerwise"])


def test_value_labels() -> None:
    assert [value_label(v) for v in ("a", 1, 0.5, True, None, [1, 2], {"b": 1})] == [
        "a",
        "1",
        "0.5",
        "true",
        "null",
        "[1,2]",
        '{"b":1}',
    ]


# --------------------------------------------------------------------------------------------
# shipped files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_experiments_validate(path: Path) -> None:
    experiment = load_experiment(path)
    runs = expand_grid(experiment)
    assert runs and experiment.name == path.stem
    assert path.read_text().startswith(
        "# yaml-language-server: $schema=../schemas/experiment.schema.json\n"
    )


def test_quickstart_is_tiny() -> None:
    runs = expand_grid(load_experiment(ROOT / "experiments" / "quickstart.yaml"))
    assert {r.config.training.training_architecture for r in runs} == {
        "blockwise",
        "stackwise",
        "rackwise",
    }
    for run in runs:
        model, training = run.config.model, run.config.training
        assert model.d_model <= 64 and model.n_blocks <= 4
        # About a million training tokens per run keeps the whole grid near a minute on 2 cores.
        assert training.seq_len * training.batch_size * (training.budget.steps or 0) <= 1_000_000


def test_json_schemas_are_current() -> None:
    assert stale_json_schemas(ROOT / "schemas") == [], "run `stackwise schema` to regenerate"


def test_experiment_schema_types_the_base_sections() -> None:
    import json

    schema = json.loads((ROOT / "schemas" / "experiment.schema.json").read_text())
    assert schema["properties"]["model"]["$ref"] == "#/$defs/ModelConfig"
    assert schema["additionalProperties"] is False
    assert (
        "layerwise"
        in schema["$defs"]["TrainingConfig"]["properties"]["training_architecture"]["enum"]
    )
    assert set(ExperimentConfig.model_fields) <= set(schema["properties"])


def test_from_yaml_round_trip_and_strict_errors(tmp_path: Path) -> None:
    """`StackWiseConfig.from_yaml` (the seed's entry point) is as strict as experiment files."""
    config = StackWiseConfig()
    config.training.training_architecture = "layerwise"
    path = tmp_path / "run.yaml"
    config.to_yaml(path)
    loaded = StackWiseConfig.from_yaml(path)
    assert loaded == config
    assert loaded.config_hash() == config.config_hash()

    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text("model:\n  d_model: 64\n  d_model: 128\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"duplicate.yaml:3: model.d_model: duplicate key"):
        StackWiseConfig.from_yaml(duplicate)

    misspelled = tmp_path / "misspelled.yaml"
    misspelled.write_text("training:\n  optimzer: {lr: 0.1}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"did you mean 'optimizer'"):
        StackWiseConfig.from_yaml(misspelled)


# --------------------------------------------------------------------------------------------
# numbers: finite floats, booleans are not numbers, integral floats for integer fields
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "text"),
    [
        ({"training": {"optimizer": {"lr": float("inf")}}}, "training.optimizer.lr", "finite"),
        ({"training": {"optimizer": {"lr": float("nan")}}}, "training.optimizer.lr", "finite"),
        ({"training": {"budget": {"flops": 1e400}}}, "training.budget.flops", "finite"),
        ({"training": {"optimizer": {"lr": "1e-3"}}}, "training.optimizer.lr", "not a string"),
        ({"training": {"budget": {"steps": "100"}}}, "training.budget.steps", "not a string"),
        ({"model": {"n_heads": True}}, "model.n_heads", "not a boolean"),
        ({"training": {"optimizer": {"lr": True}}}, "training.optimizer.lr", "not a boolean"),
        (
            {"training": {"optimizer": {"betas": [True, 0.9]}}},
            "training.optimizer.betas",
            "boolean",
        ),
        ({"training": {"budget": {"steps": 1.5}}}, "training.budget.steps", "whole number"),
        ({"data": {"max_tokens": 12.5}}, "data.max_tokens", "whole number"),
        ({"model": {"d_model": 1e400}}, "model.d_model", "finite whole number"),
    ],
)
def test_numbers_must_be_finite_and_booleans_are_not_numbers(
    data: dict, field: str, text: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        StackWiseConfig.model_validate(data)
    issues = validation_issues(caught.value, StackWiseConfig)
    assert [".".join(map(str, i.path)) for i in issues] == [field]
    assert text in issues[0].message


def test_integral_floats_are_whole_numbers_from_yaml(tmp_path: Path) -> None:
    """`1e6` (a float as in YAML 1.2; PyYAML's YAML 1.1 would make it a string) and `1.0e4` are
    whole numbers; a quoted number is a string, and strings are not numbers."""
    path = write(
        tmp_path,
        """
        name: integral
        data: {max_tokens: 1e6}
        training: {budget: {steps: 1.0e4}, optimizer: {lr: 1e-3}}
        """,
    )
    (run,) = expand_grid(load_experiment(path))
    assert run.config.data.max_tokens == 1_000_000 and type(run.config.data.max_tokens) is int
    assert run.config.training.budget.steps == 10_000
    assert run.config.training.optimizer.lr == 0.001
    assert parse_override("training.budget.steps=2e3")[1] == 2000.0
    (over,) = expand_grid(load_experiment(path), ["training.budget.steps=2e3"])
    assert over.config.training.budget.steps == 2000
    quoted = write(
        tmp_path,
        """
        name: quoted
        training: {optimizer: {lr: '1e-3'}}
        """,
        name="quoted.yaml",
    )
    with pytest.raises(ConfigError) as caught:
        expand_grid(load_experiment(quoted))
    assert caught.value.field == "training.optimizer.lr" and caught.value.line == 2
    assert "not a string" in caught.value.message


def test_infinite_lr_in_a_file_names_file_line_and_field(tmp_path: Path) -> None:
    error = experiment_error(tmp_path, "name: e\ntraining:\n  optimizer:\n    lr: .inf\n")
    assert error.format().startswith(f"{tmp_path / 'exp.yaml'}:4: training.optimizer.lr: ")


# --------------------------------------------------------------------------------------------
# grid: short axis names, size limit before expansion, the user's word for the mode
# --------------------------------------------------------------------------------------------


def test_documented_short_names_are_grid_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        name: short
        grid:
          mode: [layerwise, rackwise]
          objective: [clm]
          attention: [mha, gqa]
        exclude:
          - {mode: rackwise, attention: gqa}
        """,
    )
    runs = expand_grid(load_experiment(path))
    assert [r.name for r in runs] == [
        "mode=layerwise,objective=clm,attention=mha",
        "mode=layerwise,objective=clm,attention=gqa",
        "mode=rackwise,objective=clm,attention=mha",
    ]
    assert runs[0].config.training.training_architecture == "blockwise"
    assert runs[1].config.model.attention_type == "gqa"
    # The dotted name reaches the same axis.
    only = expand_grid(load_experiment(path), only=["training.training_architecture=rackwise"])
    assert [r.name for r in only] == ["mode=rackwise,objective=clm,attention=mha"]


def test_short_name_and_dotted_name_of_one_axis_is_an_error(tmp_path: Path) -> None:
    error = experiment_error(
        tmp_path,
        """
        name: twice
        grid:
          mode: [layerwise]
          training.training_architecture: [rackwise]
        """,
    )
    assert "grid.training.training_architecture" in error.format()
    assert "same axis" in error.format()


def test_grid_size_is_the_product_of_axis_lengths_before_exclude(tmp_path: Path) -> None:
    from stackwise.config.experiment import grid_size

    path = write(
        tmp_path,
        """
        name: sized
        grid:
          training.seed: [0, 1, 2]
          training.optimizer.lr: [0.001, 0.002, 0.003]
          training.batch_size: [1, 2, 3, 4]
        zip: [[training.seed, training.optimizer.lr]]
        exclude:
          - {seed: 0}
        """,
    )
    experiment = load_experiment(path)
    assert grid_size(experiment) == 3 * 4  # the zip group counts once; exclude is not subtracted
    assert len(expand_grid(experiment)) == 2 * 4
    with pytest.raises(ConfigError, match=r"grid: the grid has 12 points \(3 x 4\), more than"):
        expand_grid(experiment, max_runs=11)
    assert len(expand_grid(experiment, max_runs=12)) == 8


def test_a_million_point_grid_fails_fast_without_expanding(tmp_path: Path) -> None:
    import time

    axes = "\n".join(
        f"  {key}: [{', '.join(str(v) for v in range(1, 11))}]"
        for key in (
            "training.seed",
            "training.log_every_steps",
            "training.batch_size",
            "training.seq_len",
            "training.eval.batches",
            "training.grad_accum_steps",
        )
    )
    path = tmp_path / "huge.yaml"
    path.write_text(f"name: huge\ngrid:\n{axes}\n", encoding="utf-8")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        expand_grid(load_experiment(path))
    assert time.perf_counter() - started < 2.0
    assert caught.value.format() == (
        f"{path}:2: grid: the grid has 1,000,000 points (10 x 10 x 10 x 10 x 10 x 10), more "
        "than the limit of 10,000; make it smaller, or pass --max-runs 1000000 to allow it"
    )


def test_layerwise_keeps_its_name_as_a_label_not_an_identity() -> None:
    layer = StackWiseConfig.model_validate({"training": {"training_architecture": "layerwise"}})
    block = StackWiseConfig.model_validate({"training": {"training_architecture": "blockwise"}})
    assert layer.training.mode_label == "layerwise"
    assert block.training.mode_label == "blockwise"
    assert layer.training.training_architecture == "blockwise"
    assert layer == block and layer.config_hash() == block.config_hash()
    assert layer.model_copy(deep=True).training.mode_label == "layerwise"
    layer.training.training_architecture = "stackwise"
    assert layer.training.mode_label == "stackwise"


# --------------------------------------------------------------------------------------------
# limits: parameters counted without building, estimates that never blow up, memory check
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {},
        {
            "model": {
                "d_model": 64,
                "n_heads": 4,
                "attention_type": "gqa",
                "n_kv_heads": 2,
                "tie_embeddings": False,
            }
        },
        {
            "model": {
                "d_model": 64,
                "n_heads": 4,
                "attention_type": "mla",
                "mla": {"q_lora_rank": 16},
            }
        },
        {
            "model": {
                "d_model": 96,
                "n_heads": 4,
                "attention_type": "mla",
                "mla": {"kv_lora_rank": 8, "rope_head_dim": 4},
            }
        },
        {"model": {"d_model": 64, "n_heads": 4, "attention_type": "kernel", "d_ff": 100}},
        {
            "model": {
                "d_model": 64,
                "n_heads": 4,
                "stacks": [
                    {"n_blocks": 2, "attention_type": "mla", "n_heads": 2},
                    {"n_blocks": 1, "d_ff": 32, "n_kv_heads": 2},
                ],
            },
            "data": {"tokenizer": "bpe", "bpe_vocab_size": 500},
        },
    ],
)
def test_parameter_count_without_building_matches_the_built_rack(data: dict) -> None:
    from stackwise.model.architecture import create_rack_from_config
    from stackwise.training.limits import parameter_count

    config = StackWiseConfig.model_validate(data)
    built = config.to_dict()
    built["model"]["vocab_size"] = 500 if config.data.tokenizer == "bpe" else 260
    rack = create_rack_from_config(built)
    reference = sum(p.numel() for p in {id(p): p for p in rack.parameters()}.values())
    assert parameter_count(config) == reference


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"model": {"d_model": 1_000_000_000, "n_heads": 8}}, "model.d_model"),
        # 16 bytes a parameter (weights, gradients, AdamW state) dominate, not the batch.
        ({"model": {"d_model": 100_000, "n_heads": 8}}, "model.d_model"),
        (
            {"model": {"architecture": {"n_stacks": 1024, "blocks_per_stack": 1024}}},
            "model.architecture.n_stacks",
        ),
        ({"training": {"batch_size": 1_000_000_000}}, "training.batch_size"),
    ],
)
def test_absurd_runs_are_estimated_fast_and_rejected(data: dict, field: str) -> None:
    import time

    from stackwise.training.limits import memory_problem
    from stackwise.training.plan import estimate_run

    config = StackWiseConfig.model_validate(data)
    estimate_run(StackWiseConfig())  # imports and first-call costs out of the timing
    started = time.perf_counter()
    estimate = estimate_run(config)  # never raises, never builds a huge rack
    assert time.perf_counter() - started < 3.0
    # A hand bound: the fp32 weights of the blocks alone (attention 4 d^2 + SwiGLU 3 d d_ff).
    d, blocks = config.model.d_model, config.model.n_blocks
    d_ff = 8 * ((8 * d // 3 + 7) // 8) if d < 1024 else 256 * ((8 * d // 3 + 255) // 256)
    assert estimate.peak_memory_bytes >= 4 * blocks * (4 * d * d + 3 * d * d_ff)
    problem = memory_problem(config, estimate, available=64 * 2**30, where="a 64 GiB device")
    assert problem is not None and problem.field == field
    assert "more than the 64.0 GiB of a 64 GiB device" in problem.message


def test_ordinary_runs_pass_the_memory_check_without_estimating() -> None:
    from stackwise.training.limits import check_run_memory, memory_upper_bound
    from stackwise.training.plan import estimate_run

    config = StackWiseConfig.model_validate(
        {"model": {"d_model": 64, "n_heads": 4}, "training": {"budget": {"steps": 20}}}
    )
    assert check_run_memory(config) is None
    assert memory_upper_bound(config) >= estimate_run(config).peak_memory_bytes


def test_favor_sampling_is_part_of_the_identity_only_where_favor_attention_runs() -> None:
    """Runs recorded before the FAVOR+ draw could be chosen keep their identity: the setting
    counts only in runs with FAVOR+ kernel attention (in the model or in one stack)."""

    def config_hash(model: dict) -> str:
        return StackWiseConfig.model_validate({"model": model}).config_hash()

    plain = {"attention_type": "mha"}
    orthogonal = {"kernel": {"favor_sampling": "orthogonal"}}
    assert config_hash(plain) == config_hash({**plain, **orthogonal})
    elu = {"attention_type": "kernel", "kernel": {"feature_map": "elu"}}
    elu_orthogonal = {
        "attention_type": "kernel",
        "kernel": {"feature_map": "elu", **orthogonal["kernel"]},
    }
    assert config_hash(elu) == config_hash(elu_orthogonal)
    favor = {"attention_type": "kernel", "kernel": {"feature_map": "favor"}}
    hashes = {
        config_hash({**favor, "kernel": {"feature_map": "favor", "favor_sampling": sampling}})
        for sampling in ("orthogonal", "antithetic", "regularized")
    }
    assert len(hashes) == 3 and config_hash(favor) in hashes
    mixed = {
        "kernel": {"feature_map": "favor"},
        "stacks": [{"n_blocks": 1}, {"n_blocks": 1, "attention_type": "kernel"}],
    }
    mixed_orthogonal = {**mixed, "kernel": {"feature_map": "favor", "favor_sampling": "orthogonal"}}
    assert config_hash(mixed) != config_hash(mixed_orthogonal)


# --------------------------------------------------------------------------------------------
# replicate seeds and tuned settings
# --------------------------------------------------------------------------------------------


def test_seeds_and_tune_multiply_runs_without_becoming_coordinates(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        name: replicated
        training: {budget: {steps: 10}}
        grid:
          mode: [layerwise, rackwise]
        tune:
          training.optimizer.lr: [0.001, 0.003]
        seeds: [0, 5]
        """,
    )
    runs = expand_grid(load_experiment(path))
    # 2 modes x 2 rates x 2 seeds, seeds innermost, in grid order
    assert [r.name for r in runs[:4]] == [
        "mode=layerwise,lr=0.001,seed=0",
        "mode=layerwise,lr=0.001,seed=5",
        "mode=layerwise,lr=0.003,seed=0",
        "mode=layerwise,lr=0.003,seed=5",
    ]
    assert len(runs) == 8 and len({r.config_hash for r in runs}) == 8
    last = runs[-1]
    assert last.coordinates == {"mode": "rackwise"}  # the grid only
    assert last.tuned == {"lr": "0.003"} and last.seed == 5 and last.point == "mode=rackwise"
    assert last.config.training.seed == 5 and last.config.training.optimizer.lr == 0.003
    # --only reaches seeds and tuned values like any axis
    only = expand_grid(load_experiment(path), only=["seed=5", "lr=0.001"])
    assert [r.name for r in only] == [
        "mode=layerwise,lr=0.001,seed=5",
        "mode=rackwise,lr=0.001,seed=5",
    ]


def test_seeds_repeated_or_also_on_the_grid_are_errors(tmp_path: Path) -> None:
    error = experiment_error(tmp_path, "name: x\nseeds: [0, 1, 0]\n")
    assert error.field == "seeds" and "repeated: 0" in error.message
    error = experiment_error(tmp_path, "name: x\ngrid:\n  training.seed: [0, 1]\nseeds: [2, 3]\n")
    assert error.field == "seeds" and "training.seed" in error.message
    error = experiment_error(tmp_path, "name: x\ntune:\n  size: [small]\n")
    assert error.field == "tune.size" and "preset axis" in error.message
    error = experiment_error(tmp_path, "name: x\ntune:\n  training.optimizer.lrr: [0.1]\n")
    assert error.field.startswith("tune.training.optimizer.lrr")
    assert "did you mean" in error.message and "'lr'" in error.message


def test_tuned_value_listed_twice_points_at_the_tune_entry(tmp_path: Path) -> None:
    error = experiment_error(tmp_path, "name: x\ntune:\n  lr: [0.001, 0.001]\n")
    assert error.field == "tune.lr.1" and error.line == 3


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    import time

    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 10):
        refs = ", ".join([f"*a{level - 1}"] * 9)
        levels.append(f"a{level}: &a{level} [{refs}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("name: bomb\nmodel:\n  " + "\n  ".join(levels) + "\n", encoding="utf-8")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        expand_grid(load_experiment(path))
    assert time.perf_counter() - started < 2.0
    assert "aliases" in caught.value.message and caught.value.line is not None
    # a few aliases are fine
    fine = write(
        tmp_path,
        """
        name: fine
        training: &t {seq_len: 32, batch_size: 4, budget: {steps: 3}}
        presets:
          size: {tiny: {model.d_model: 32, training: *t}}
        """,
        name="fine.yaml",
    )
    assert load_experiment(fine).config.training["seq_len"] == 32


def test_oversized_yaml_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("name: big\ndescription: " + "x" * (5 * 2**20) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_experiment(path)
    assert "more than the limit" in caught.value.message


def test_numbers_on_axes_keep_the_text_they_were_written_as(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        name: labels
        grid:
          training.budget.flops: [1.0e11, 3.16e12]
        tune:
          lr: [0.001, 3.0e-2]
        exclude:
          - {lr: 3e-2, budget: 1e11}
        """,
    )
    runs = expand_grid(load_experiment(path))
    assert [r.name for r in runs] == [
        "budget=1.0e11,lr=0.001",
        "budget=3.16e12,lr=0.001",
        "budget=3.16e12,lr=3.0e-2",
    ]
    assert runs[-1].config.training.optimizer.lr == 0.03
    assert runs[-1].config.training.budget.flops == 3.16e12


def test_settings_added_later_keep_the_identities_of_earlier_runs() -> None:
    """A setting added with a default that changes nothing (here `data.tokenizer_file`, unset;
    `data.prepare_above_mb`, which decides only how the same batches are read) leaves a
    config's hash as the code before it computed it: finished runs stay finished and
    checkpoints stay resumable. The values were computed by that earlier code."""
    runs = expand_grid(load_experiment(ROOT / "experiments" / "quickstart.yaml"))
    hashes = {run.name: run.config.config_hash() for run in runs}
    assert hashes == {
        "size=small,mode=layerwise": "0e6b8d3f71f77009",
        "size=small,mode=stackwise": "dac8637890b33b03",
        "size=small,mode=rackwise": "0b21cd3d4a6615c7",
    }
    changed = runs[0].config.model_copy(deep=True)
    changed.data.prepare_above_mb = 1.0
    assert changed.config_hash() == hashes[runs[0].name]
