"""What `stackwise validate` says about mistakes: every mistake of a file in one pass, a value
or a key written from the wrong place named as the user meant it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

Cli = Callable[..., subprocess.CompletedProcess[str]]


def _validate(run_cli: Cli, folder: Path, text: str, *options: str) -> list[str]:
    path = folder / "typos.yaml"
    path.write_text(text, encoding="utf-8")
    done = run_cli(folder, "validate", str(path), *options)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def test_every_mistake_of_a_file_is_reported_in_one_pass(tmp_path: Path, run_cli: Cli) -> None:
    text = (
        "name: typos\n"
        "model:\n"
        "  d_modl: 64\n"
        "  attention_type: gqaa\n"
        "training:\n"
        "  batch_sze: 4\n"
        "  lr: 0.1\n"
    )
    errors = _validate(run_cli, tmp_path, text)
    assert len(errors) == 4, errors
    by_line = {error.split(":")[2]: error for error in errors}
    assert "did you mean 'd_model'?" in by_line["3"]
    # A value: the nearest allowed one, and every allowed one.
    assert "got 'gqaa'; did you mean 'gqa'?" in by_line["4"]
    assert "'mha', 'gqa', 'mla' or 'kernel'" in by_line["4"]
    assert "did you mean 'batch_size'?" in by_line["6"]
    # A key of a deeper section: its full paths.
    assert "did you mean 'training.optimizer.lr' or 'training.fusion.lr'?" in by_line["7"]


def test_a_set_path_missing_its_section_is_named_in_full(tmp_path: Path, run_cli: Cli) -> None:
    text = "name: fine\ntraining:\n  budget: {steps: 4}\n"
    errors = _validate(run_cli, tmp_path, text, "--set", "budget.steps=5")
    assert errors == [
        "error: --set budget.steps=5: unknown field 'budget'; did you mean 'training.budget.steps'?"
    ]
