"""The `stackwise` command line, run for real in subprocesses.

Every broken file in tests/bad_configs/ must give exit status 2, a one-line message naming the
file, the dotted field and the line (as its `# expect:` header says), no traceback, and nothing
written. Each file starts with ``# expect: <field or -> | <line or -> | <text in the message>``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "bad_configs"
BAD_FILES = sorted(BAD.glob("*.yaml"))
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def stackwise(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (falls back to `python -m stackwise`)."""
    script = shutil.which("stackwise", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "stackwise"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "COLUMNS": "200"}
    return subprocess.run(
        [*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def expectation(path: Path) -> tuple[str | None, int | None, str]:
    header = path.read_text().splitlines()[0]
    assert header.startswith("# expect: "), f"{path.name} needs an '# expect:' header"
    field, line, text = (part.strip() for part in header.removeprefix("# expect: ").split(" | "))
    return (None if field == "-" else field, None if line == "-" else int(line), text)


def expected_prefix(path: Path) -> str:
    field, line, _ = expectation(path)
    prefix = f"{path}:{line}" if line is not None else str(path)
    return f"{prefix}: {field}: " if field else prefix


def assert_clean_failure(result: subprocess.CompletedProcess[str], cwd: Path) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (cwd / "mlruns").exists()
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_bad_config_fails_cleanly_before_anything_runs(path: Path, tmp_path: Path) -> None:
    result = stackwise("run", path, cwd=tmp_path)
    assert_clean_failure(result, tmp_path)
    _, line, text = expectation(path)
    errors = [row for row in result.stderr.splitlines() if row.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    message = errors[0].removeprefix("error: ")
    assert message.startswith(expected_prefix(path)), message
    if line is not None:
        assert message.startswith(f"{path}:{line}:")
    assert text in message


def test_all_errors_of_all_files_are_reported_together(tmp_path: Path) -> None:
    result = stackwise("validate", *BAD_FILES, tmp_path / "missing.yaml", cwd=tmp_path)
    assert_clean_failure(result, tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(BAD_FILES) + 1
    for path in BAD_FILES:
        assert any(line.startswith(f"error: {expected_prefix(path)}") for line in errors), path
    assert f"error: {tmp_path / 'missing.yaml'}: file not found" in errors
    assert f"{len(BAD_FILES) + 1} errors; nothing was run or written." in result.stderr


def test_missing_file_and_unmatched_glob(tmp_path: Path) -> None:
    result = stackwise("run", "nope.yaml", "experiments/*.yml", cwd=tmp_path)
    assert_clean_failure(result, tmp_path)
    assert "error: nope.yaml: file not found" in result.stderr
    assert "error: experiments/*.yml: no file matches this pattern" in result.stderr


def test_validate_shipped_experiments_with_quoted_glob() -> None:
    result = stackwise("validate", "experiments/*.yaml", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for name in ("quickstart", "size_vs_mode", "objectives", "attention"):
        assert f"experiments/{name}.yaml" in result.stdout
    assert f"{len(list((ROOT / 'experiments').glob('*.yaml')))} files valid" in result.stdout


def test_dry_run_lists_runs_and_writes_nothing(tmp_path: Path) -> None:
    result = stackwise(
        "run",
        QUICKSTART,
        "--dry-run",
        "--only",
        "mode=layerwise",
        "--only",
        "mode=rackwise",
        "--set",
        "training.budget.steps=7",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "size=small,mode=layerwise" in result.stdout
    assert "size=small,mode=rackwise" in result.stdout
    assert "size=small,mode=stackwise" not in result.stdout
    assert "7 steps" in result.stdout and "2 runs in 1 file" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_bad_set_and_only_options(tmp_path: Path) -> None:
    result = stackwise(
        "run", QUICKSTART, "--set", "training.optimzer.lr=1", "--only", "mode=x", cwd=tmp_path
    )
    assert_clean_failure(result, tmp_path)
    assert "--set training.optimzer.lr=1: unknown field 'optimzer'; did you mean" in result.stderr
    assert "'x' is not a value of axis 'mode'" in result.stderr
    result = stackwise("run", QUICKSTART, "--set", "training.seq_len=1", cwd=tmp_path)
    assert_clean_failure(result, tmp_path)
    assert "training.seq_len: Input should be greater than or equal to 2" in result.stderr
    assert "(from --set training.seq_len=1)" in result.stderr
    result = stackwise("run", QUICKSTART, "--only", "training.objective=mlm", cwd=tmp_path)
    assert_clean_failure(result, tmp_path)
    assert "no run of the given files matches" in result.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = stackwise("run", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = stackwise("frobnicate", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_help_and_module_entry_point(tmp_path: Path) -> None:
    result = stackwise("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("validate", "plan", "run", "schema"):
        assert command in result.stdout
    module = subprocess.run(
        [sys.executable, "-m", "stackwise", "run", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert module.returncode == 0 and "--dry-run" in module.stdout and "--only" in module.stdout


LIGHT_IMPORTS = """
import sys
from stackwise.cli import app
for args in (["--help"], ["validate", sys.argv[1]], ["run", "--dry-run", sys.argv[1]]):
    try:
        app(args)
    except SystemExit as done:
        assert not done.code, (args, done.code)
heavy = sorted({"torch", "mlflow", "numpy", "polars"} & set(sys.modules))
assert not heavy, heavy
print("light")
"""


def test_help_validate_and_dry_run_do_not_import_torch_or_mlflow(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_IMPORTS, str(QUICKSTART)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("light")


def test_schema_check_and_regenerate(tmp_path: Path) -> None:
    assert stackwise("schema", "--check", cwd=ROOT).returncode == 0
    missing = stackwise("schema", "--check", "--dir", tmp_path / "schemas", cwd=tmp_path)
    assert missing.returncode == 1 and "missing:" in missing.stderr
    (tmp_path / "schemas").mkdir()
    for name in ("experiment.schema.json", "stackwise-config.schema.json"):
        (tmp_path / "schemas" / name).write_text("{}\n")
    stale = stackwise("schema", "--check", "--dir", tmp_path / "schemas", cwd=tmp_path)
    assert stale.returncode == 1 and "stale" in stale.stderr
    written = stackwise("schema", "--dir", tmp_path / "schemas", cwd=tmp_path)
    assert written.returncode == 0
    for name in ("experiment.schema.json", "stackwise-config.schema.json"):
        assert (tmp_path / "schemas" / name).read_text() == (ROOT / "schemas" / name).read_text()
    assert (
        stackwise("schema", "--check", "--dir", tmp_path / "schemas", cwd=tmp_path).returncode == 0
    )


def test_plan_estimates_every_run(tmp_path: Path) -> None:
    result = stackwise("plan", QUICKSTART, "--set", "training.device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for mode in ("layerwise", "stackwise", "rackwise"):
        assert f"size=small,mode={mode}" in result.stdout
    assert "cpu" in result.stdout and "MiB" in result.stdout
    assert "3 runs" in result.stdout
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# several files, the environment (devices, stores) and interrupted runs
# --------------------------------------------------------------------------------------------

ATTENTION = ROOT / "experiments" / "attention.yaml"


def test_only_may_name_a_value_that_only_some_files_have(tmp_path: Path) -> None:
    """attention.yaml has no layerwise runs: with several files that leaves it out, not an error."""
    result = stackwise(
        "run", QUICKSTART, ATTENTION, "--dry-run", "--only", "mode=layerwise", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "size=small,mode=layerwise" in result.stdout
    assert "attention=" not in result.stdout
    assert "1 run in 2 files" in result.stdout
    # Alternatives of one axis still add up, per file.
    result = stackwise(
        "validate", QUICKSTART, ATTENTION, "--only", "mode=layerwise", "--only", "mode=stackwise",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 files valid, 6 runs." in result.stdout  # 2 of quickstart + 4 of attention
    # A value no file has is still a mistake, reported for every file.
    result = stackwise("run", QUICKSTART, ATTENTION, "--only", "mode=layrwise", cwd=tmp_path)
    assert_clean_failure(result, tmp_path)
    assert result.stderr.count("'layrwise' is not a value of axis 'mode'") == 2


def test_a_file_named_twice_runs_once(tmp_path: Path) -> None:
    relative = os.path.relpath(QUICKSTART, tmp_path)
    result = stackwise("run", QUICKSTART, relative, "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 runs in 1 file." in result.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_user_error(tmp_path: Path) -> None:
    for command in ("plan", "run"):
        result = stackwise(command, QUICKSTART, "--set", "training.device=cuda", cwd=tmp_path)
        assert_clean_failure(result, tmp_path)
        assert (
            f"error: {QUICKSTART}: training.device: 'cuda' is not available here" in result.stderr
        )


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_unusable_tracking_store_is_a_user_error(tmp_path: Path) -> None:
    """Checked before anything runs: no traceback, no minutes of retries, nothing written."""
    unreachable = f"http://127.0.0.1:{_free_port()}"
    for uri, message in (
        ("foo://bar", "unsupported tracking URI 'foo://bar'"),
        (unreachable, f"cannot reach the MLflow tracking server at {unreachable}"),
        (f"file://{tmp_path}/legacy", "MLflow 3 no longer opens"),
    ):
        result = stackwise("run", QUICKSTART, "--tracking-uri", uri, cwd=tmp_path)
        assert_clean_failure(result, tmp_path)
        assert "error: --tracking-uri: " in result.stderr and message in result.stderr
    result = stackwise(
        "run", QUICKSTART, "--set", "tracking.uri=gopher://x", "--only", "mode=rackwise",
        cwd=tmp_path,
    )  # fmt: skip
    assert_clean_failure(result, tmp_path)
    assert f"error: {QUICKSTART}: tracking.uri: unsupported tracking URI" in result.stderr


def test_missing_data_files_are_found_before_training(tmp_path: Path) -> None:
    for command in ("validate", "run"):
        result = stackwise(
            command, QUICKSTART, "--set", "data.source=files",
            "--set", 'data.paths=["missing.txt", "corpus/*.md"]', cwd=tmp_path,
        )  # fmt: skip
        assert_clean_failure(result, tmp_path)
        assert f"error: {QUICKSTART}: data.paths: 'missing.txt' does not exist" in result.stderr
        assert f"error: {QUICKSTART}: data.paths: no file matches 'corpus/*.md'" in result.stderr


# --------------------------------------------------------------------------------------------
# limits and messages (issue: runs that survive what clusters do)
# --------------------------------------------------------------------------------------------


def stackwise_at(columns: int, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = shutil.which("stackwise", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "stackwise"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "COLUMNS": str(columns)}
    return subprocess.run(
        [*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_two_files_with_one_name_are_an_error_naming_both(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("name: same\n", encoding="utf-8")
    second.write_text("description: another\nname: same\n", encoding="utf-8")
    result = stackwise("validate", first, second, cwd=work)
    assert_clean_failure(result, work)
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: {second}:2: name: 'same' is also the name of {first}")


def test_memory_check_rejects_absurd_runs_unless_told_not_to(tmp_path: Path) -> None:
    result = stackwise("validate", BAD / "huge_batch.yaml", cwd=tmp_path)
    assert_clean_failure(result, tmp_path)
    assert "--no-memory-check" in result.stderr
    allowed = stackwise("validate", BAD / "huge_batch.yaml", "--no-memory-check", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr


def test_plan_of_a_rack_too_large_to_build_says_so_quickly(tmp_path: Path) -> None:
    import time

    started = time.perf_counter()
    result = stackwise("plan", BAD / "huge_depth.yaml", "--no-memory-check", cwd=tmp_path)
    assert time.perf_counter() - started < 60  # about 3 s; was past 60 s at 2.2 GB
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("huge_depth"))
    assert "3.3T" in row and "≥" in row
    assert "too large to plan stage by stage (1,048,576 blocks" in result.stderr


def test_max_runs_raises_the_grid_limit(tmp_path: Path) -> None:
    result = stackwise("validate", BAD / "huge_grid.yaml", "--max-runs", "999999", cwd=tmp_path)
    assert_clean_failure(result, tmp_path)
    assert "more than the limit of 999,999; make it smaller, or pass --max-runs 1000000" in (
        result.stderr
    )


def test_schema_check_outside_the_project_says_missing(tmp_path: Path) -> None:
    result = stackwise("schema", "--check", cwd=tmp_path)
    assert result.returncode == 1
    assert "missing: schemas/experiment.schema.json" in result.stderr
    assert "stale" not in result.stderr


def test_layerwise_and_full_names_in_the_dry_run_at_80_columns(tmp_path: Path) -> None:
    """Output that is not a terminal gets full plain rows, whatever COLUMNS says."""
    result = stackwise_at(80, "run", QUICKSTART, "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("quickstart")]
    assert [row[1] for row in rows] == [
        "size=small,mode=layerwise",
        "size=small,mode=stackwise",
        "size=small,mode=rackwise",
    ]
    assert [row[3] for row in rows] == ["layerwise", "stackwise", "rackwise"]
    assert "…" not in result.stdout


def test_tables_on_a_narrow_terminal_fold_columns_and_never_cut(tmp_path: Path) -> None:
    """On a terminal (a pty here) of 80 columns the dry-run table is split into column groups
    that repeat the run name; every cell is shown whole."""
    import pty

    script = shutil.which("stackwise", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "stackwise"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "COLUMNS": "80", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [*command, "run", str(QUICKSTART), "--dry-run"],
        cwd=tmp_path,
        env=env,
        stdout=follower,
        stderr=subprocess.PIPE,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=60)
    os.close(leader)
    import re

    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", b"".join(chunks).decode("utf-8", "replace"))
    lines = text.splitlines()
    assert process.returncode == 0
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text
    for name in ("size=small,mode=layerwise", "size=small,mode=rackwise"):
        assert sum(name in line for line in lines) >= 2  # repeated in each column group
    from stackwise.config.experiment import expand_grid, load_experiment

    for spec in expand_grid(load_experiment(QUICKSTART)):
        assert spec.config_hash in text


def test_brackets_in_run_names_and_errors_are_printed_not_interpreted(tmp_path: Path) -> None:
    """Rich markup characters in grid values, run names and error messages: shown as written."""
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(
        "".join(
            f'{{"text": "document number {i} with some words in it", "[/x]": "more words {i}"}}\n'
            for i in range(300)
        ),
        encoding="utf-8",
    )
    (tmp_path / "brackets.yaml").write_text(
        textwrap.dedent(
            """
            name: brackets
            model: {d_model: 32, n_heads: 2, architecture: {n_stacks: 1, blocks_per_stack: 1}}
            training: {seq_len: 16, batch_size: 2, budget: {steps: 2}, eval: {batches: 1}}
            data: {source: files, paths: [docs.jsonl]}
            tracking: {log_model: false}
            grid:
              data.text_column: [text, "[/x]", "[bold]y"]
            """
        ).lstrip(),
        encoding="utf-8",
    )
    # The column [bold]y does not exist: an error before anything runs, printed as written.
    refused = stackwise("run", "brackets.yaml", "--threads", "1", cwd=tmp_path)
    output = refused.stdout + refused.stderr
    assert "Traceback" not in output and "MarkupError" not in output
    assert refused.returncode == 2, output
    assert "no column '[bold]y' (columns: text, [/x])" in output
    assert "(run text_column=[bold]y)" in output
    only = ("--only", "text_column=text", "--only", "text_column=[/x]")
    result = stackwise("run", "brackets.yaml", "--threads", "1", *only, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "MarkupError" not in output
    assert result.returncode == 0, output
    assert "text_column=[/x]" in output
    assert "2 finished, 0 skipped, 0 failed" in output
    help_text = stackwise("run", "--help", cwd=tmp_path).stdout
    assert "stackwise[ray]" in help_text
