"""What must be true before a grid runs (`stackwise.preflight`), called directly, and where each
run is recorded (`stackwise.tracking.logger.run_destination`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stackwise import preflight
from stackwise.config.errors import ConfigError
from stackwise.config.experiment import expand_grid, load_experiment
from stackwise.tracking.logger import run_destination

TINY = """\
model: {d_model: 32, n_heads: 2, architecture: {n_stacks: 2, blocks_per_stack: 1}}
training: {budget: {steps: 4}, batch_size: 4, seq_len: 32, device: cpu}
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(
    error: pytest.ExceptionInfo[ConfigError],
) -> list[tuple[str | None, str | None, int | None]]:
    """(file, field, line) of every error raised together."""
    return [(e.file, e.field, e.line) for e in error.value.errors]


@pytest.fixture(autouse=True)
def no_store_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# -- the files named on the command line -------------------------------------------------------


def test_globs_expand_and_a_file_named_twice_is_kept_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("b.yaml", "a.yaml", "c.txt"):
        write(tmp_path / "exp", name, "name: x\n")
    found = preflight.expand_paths(["exp/*.yaml", str(tmp_path / "exp" / "a.yaml"), "plain.yaml"])
    # sorted glob matches, then the same file by another name dropped; a plain name is kept
    # as given (whether it exists is for loading to say)
    assert found == ["exp/a.yaml", "exp/b.yaml", "plain.yaml"]


def test_a_glob_that_matches_nothing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no file matches this pattern") as caught:
        preflight.expand_paths(["none/*.yaml"])
    assert caught.value.file == "none/*.yaml"
    collected: list[ConfigError] = []
    assert preflight.expand_paths(["none/*.yaml", "x.yaml"], collected) == ["x.yaml"]
    assert [e.file for e in collected] == ["none/*.yaml"]


# -- load_plans: every file, every run ---------------------------------------------------------


def test_plans_are_every_file_with_its_runs(tmp_path: Path) -> None:
    first = write(tmp_path, "one.yaml", "name: one\n" + TINY)
    second = write(
        tmp_path, "two.yaml", "name: two\n" + TINY + "grid:\n  training.seed: [1, 2, 3]\n"
    )
    plans = preflight.load_plans([str(first), str(second)])
    assert [(e.name, [s.name for s in runs]) for e, runs in plans] == [
        ("one", ["default"]),
        ("two", ["seed=1", "seed=2", "seed=3"]),
    ]
    assert [len(runs) for _, runs in preflight.load_plans([str(second)], only=["seed=2"])] == [1]


def test_every_problem_of_every_file_is_raised_together(tmp_path: Path) -> None:
    good = write(tmp_path, "good.yaml", "name: same\n" + TINY)
    # line 3: the misspelled key
    typo = write(tmp_path, "typo.yaml", "name: typo\nmodel:\n  n_head: 4\n")
    # line 2: the second file with the name of the first
    twin = write(tmp_path, "twin.yaml", "description: another\nname: same\n" + TINY)
    with pytest.raises(ConfigError) as caught:
        preflight.load_plans([str(good), str(typo), str(twin), str(tmp_path / "gone.yaml")])
    assert sorted(problems(caught), key=str) == sorted(
        [
            (str(typo), "model.n_head", 3),
            (str(twin), "name", 2),
            (str(tmp_path / "gone.yaml"), None, None),
        ],
        key=str,
    )
    messages = {e.file: e.message for e in caught.value.errors}
    assert messages[str(twin)].startswith(f"'same' is also the name of {good}")
    assert messages[str(tmp_path / "gone.yaml")] == "file not found"


def test_data_files_are_looked_for_beside_the_experiment_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "experiments"
    write(folder, "present.txt", "some text\n")
    write(folder / "corpus", "notes.md", "more text\n")
    path = write(
        folder,
        "files.yaml",
        "name: files\n"
        + TINY
        + "data:\n"  # line 4
        + "  source: files\n"
        + "  paths:\n"
        + "    - present.txt\n"  # line 7
        + "    - missing.txt\n"  # line 8
        + "    - corpus/*.md\n"  # line 9
        + "    - corpus/*.rst\n",  # line 10
    )
    monkeypatch.chdir(tmp_path)  # elsewhere: relative paths are the file's folder's
    with pytest.raises(ConfigError) as caught:
        preflight.load_plans([str(path)])
    assert problems(caught) == [(str(path), "data.paths", 8), (str(path), "data.paths", 10)]
    assert [e.message for e in caught.value.errors] == [
        "'missing.txt' does not exist or is not a file",
        "no file matches 'corpus/*.rst'",
    ]
    assert preflight.missing_data_files([]) == []


def test_the_memory_check_is_asked_for(tmp_path: Path) -> None:
    path = write(tmp_path, "huge.yaml", "name: huge\ntraining:\n  batch_size: 1e9\n")
    assert len(preflight.load_plans([str(path)], memory_check=False)) == 1
    with pytest.raises(ConfigError, match="of memory at its peak") as caught:
        preflight.load_plans([str(path)], memory_check=True)
    assert problems(caught) == [(str(path), "training.batch_size", 3)]


def test_a_sample_pool_over_the_disk_budget_is_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "pool.yaml",
        "name: pool\n"
        "model: {d_model: 64, n_heads: 4, architecture: {n_stacks: 2, blocks_per_stack: 1}}\n"
        "training:\n"
        "  training_architecture: layerwise\n"
        "  seq_len: 64\n"
        "  batch_size: 8\n"
        "  budget: {steps: 100}\n"
        "  cache:\n"
        "    dtype: fp32\n"
        "    max_disk_gb: 0.001\n",  # line 10
    )
    with pytest.raises(ConfigError, match=r"more than the disk budget of 0\.001 GB") as caught:
        preflight.load_plans([str(path)])
    assert problems(caught) == [(str(path), "training.cache.max_disk_gb", 10)]


def test_notes_are_given_back_only_for_valid_files(tmp_path: Path) -> None:
    # layerwise and blockwise are one mode: the second run is the first again
    grid = "grid:\n  training.training_architecture: [layerwise, blockwise]\n"
    path = write(tmp_path, "dup.yaml", "name: dup\n" + TINY + grid)
    notes: list[str] = []
    plans = preflight.load_plans([str(path)], notes=notes)
    assert [s.name for s in plans[0][1]] == ["mode=layerwise"]
    assert len(notes) == 1 and "run mode=blockwise is identical to run mode=layerwise" in notes[0]

    broken = write(tmp_path, "broken.yaml", "name: broken\nmodel:\n  n_head: 4\n")
    notes = []
    with pytest.raises(ConfigError):
        preflight.load_plans([str(path), str(broken)], notes=notes)
    assert notes == []  # nothing is said about files that will not run
    # a filter that leaves no run is an error too
    with pytest.raises(ConfigError, match="no run of the given files matches"):
        preflight.load_plans([str(path)], only=["training.objective=mlm"])


# -- before training: devices and stores -------------------------------------------------------


def _plans(tmp_path: Path, text: str, name: str = "run.yaml") -> preflight.Plans:
    return preflight.load_plans([str(write(tmp_path, name, text))])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_an_error(tmp_path: Path) -> None:
    preflight.check_devices(_plans(tmp_path, "name: cpu\n" + TINY))  # cpu: always there
    plans = _plans(tmp_path, "name: gpu\n" + TINY + "grid:\n  training.device: [cpu, cuda]\n")
    with pytest.raises(ConfigError, match="'cuda' is not available here") as caught:
        preflight.check_devices(plans)
    assert problems(caught) == [(str(tmp_path / "run.yaml"), "training.device", None)]


def test_an_unusable_store_names_where_its_uri_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plans = _plans(
        tmp_path,
        "name: stores\n" + TINY + "tracking: {uri: 'gopher://x'}\ngrid:\n  training.seed: [1, 2]\n",
    )
    # the config's URI: one error for the two runs that share it
    with pytest.raises(ConfigError, match="unsupported tracking URI 'gopher://x'") as caught:
        preflight.check_stores(plans, None)
    assert problems(caught) == [(str(tmp_path / "run.yaml"), "tracking.uri", None)]
    # the environment overrides the config, the flag both
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://env")
    with pytest.raises(ConfigError, match="'foo://env'") as caught:
        preflight.check_stores(plans, None)
    assert problems(caught) == [(None, "MLFLOW_TRACKING_URI", None)]
    with pytest.raises(ConfigError, match="'foo://flag'") as caught:
        preflight.check_stores(plans, "foo://flag")
    assert problems(caught) == [(None, "--tracking-uri", None)]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    preflight.check_stores(plans, str(tmp_path / "store"))  # a local folder: fine
    assert not (tmp_path / "store").exists()  # checked, not created


# -- where a run is recorded -------------------------------------------------------------------


def test_a_run_goes_to_its_experiment_in_the_store_that_takes_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    by_file = write(tmp_path, "where.yaml", "name: where\n" + TINY)
    in_config = write(
        tmp_path, "named.yaml", "name: named\n" + TINY + "tracking: {experiment_name: elsewhere}\n"
    )
    (named_by_file,) = expand_grid(load_experiment(by_file))
    (named_in_config,) = expand_grid(load_experiment(in_config))

    default = f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert run_destination(named_by_file) == ("where", default)
    assert run_destination(named_in_config) == ("elsewhere", default)
    assert run_destination(named_by_file).experiment == "where"

    spec = named_by_file
    spec.config.tracking.uri = "http://config:5000"
    assert run_destination(spec).uri == "http://config:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert run_destination(spec).uri == "http://env:5000"
    assert run_destination(spec, "http://flag:5000").uri == "http://flag:5000"
    # a plain folder names the store inside it; an empty flag or variable counts as unset
    assert run_destination(spec, "store").uri == f"sqlite:///{tmp_path.resolve()}/store/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert run_destination(spec, " ").uri == "http://config:5000"
    assert os.environ["MLFLOW_TRACKING_URI"] == ""


def test_estimate_key_ignores_seed_and_learning_rate_only() -> None:
    from stackwise.config.base import StackWiseConfig
    from stackwise.preflight import estimate_key

    base = {"model": {"d_model": 32, "n_heads": 2}, "training": {"budget": {"steps": 10}}}
    key = estimate_key(StackWiseConfig.from_dict(base))
    replicate = {**base, "training": {"budget": {"steps": 10}, "seed": 3}}
    swept = {**base, "training": {"budget": {"steps": 10}, "optimizer": {"lr": 0.01}}}
    assert estimate_key(StackWiseConfig.from_dict(replicate)) == key
    assert estimate_key(StackWiseConfig.from_dict(swept)) == key
    longer = {**base, "training": {"budget": {"steps": 20}}}
    wider = {**base, "model": {"d_model": 64, "n_heads": 2}}
    assert estimate_key(StackWiseConfig.from_dict(longer)) != key
    assert estimate_key(StackWiseConfig.from_dict(wider)) != key
