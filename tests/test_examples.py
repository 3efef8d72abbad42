"""The example experiments ship with the package: `stackwise examples` lists them and
`stackwise init` starts a new experiment file from one."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

Cli = Callable[..., subprocess.CompletedProcess[str]]
REPOSITORY = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPOSITORY / "experiments").glob("*.yaml"))


def test_examples_lists_every_experiment_file_of_the_repository(
    tmp_path: Path, run_cli: Cli
) -> None:
    done = run_cli(tmp_path, "examples")
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines()[2:] if line.strip()]
    assert [name for name in listed if not name.startswith("Start")] == [
        path.stem for path in EXPERIMENTS
    ]


def test_init_writes_a_valid_file_from_an_example_and_never_overwrites(
    tmp_path: Path, run_cli: Cli
) -> None:
    done = run_cli(tmp_path, "init", "mine", "--from", "objectives")
    assert done.returncode == 0, done.stderr
    written = tmp_path / "experiments" / "mine.yaml"
    source = (REPOSITORY / "experiments" / "objectives.yaml").read_text(encoding="utf-8")
    # The example as it is, comments and all, under the new name.
    assert written.read_text(encoding="utf-8") == source.replace(
        "name: objectives", "name: mine", 1
    )
    valid = run_cli(tmp_path, "validate", str(written))
    assert valid.returncode == 0, valid.stderr
    assert "mine" in valid.stdout

    written.write_text("edited\n", encoding="utf-8")
    again = run_cli(tmp_path, "init", "mine")
    assert again.returncode == 2 and "exists already" in again.stderr
    assert written.read_text(encoding="utf-8") == "edited\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("init", "x", "--from", "quickstrt"), "did you mean 'quickstart'?"),
        (("init", "no/slash"), "cannot name an experiment"),
    ],
)
def test_init_mistakes_are_one_line_errors(
    args: tuple[str, ...], expected: str, tmp_path: Path, run_cli: Cli
) -> None:
    done = run_cli(tmp_path, *args)
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "experiments").exists()


@pytest.mark.slow
def test_the_wheel_ships_the_examples(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPOSITORY), "--no-deps", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("stackwise-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"stackwise/examples/{path.name}" for path in EXPERIMENTS} <= names
