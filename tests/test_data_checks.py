"""Data problems found before anything runs: `stackwise validate`, `plan` and `run` refuse data
without text or too short to split (exit 2, one line naming the file and setting, nothing
written), and warn once per group of runs about a budget that repeats its data more than
`stackwise.preflight.MAX_EPOCHS` times (an error with ``--strict``).

Every case is a real file and the CLI in a subprocess; the counts are checked against the
runtime itself (`stackwise.data.build_data`, and the `epochs` a real run logs).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stackwise.preflight import MAX_EPOCHS

Helper = Callable[..., Any]

# A tiny rack trained on a text file, in seconds.
MODEL = {"d_model": 16, "n_heads": 2, "architecture": {"n_stacks": 1, "blocks_per_stack": 1}}


def training(steps: int, seq_len: int, batch_size: int = 2) -> dict[str, Any]:
    return {
        "budget": {"steps": steps},
        "batch_size": batch_size,
        "seq_len": seq_len,
        "log_every_steps": 10,
        "device": "cpu",
        "eval": {"batches": 1},
        "checkpoint": {"every_steps": 1000},
    }


def write_corpus(
    folder: Path,
    write_experiment: Helper,
    data_file: str,
    steps: int = 4,
    seq_len: int = 8,
    **more: Any,
) -> Path:
    """An experiment training on `data_file` (relative to `folder`)."""
    return write_experiment(
        folder,
        "corpus",
        training=training(steps, seq_len),
        model=MODEL,
        data={"source": "files", "paths": [data_file]},
        tracking={"log_model": False},
        **more,
    )


def errors_of(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def warnings_of(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("warning:")]


def nothing_written(folder: Path) -> bool:
    """No tracking store (so no experiment and no run) in `folder`."""
    return not (folder / "mlruns").exists()


# --------------------------------------------------------------------------------------------
# data without text
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("empty.txt", "", "empty or only whitespace"),
        ("blank.txt", "  \n\t\n   \n", "empty or only whitespace"),
        (
            "blank.jsonl",
            '{"text": ""}\n{"text": null}\n{"text": "", "id": 3}\n',
            "no non-empty value in the column 'text'",
        ),
    ],
    ids=["empty", "whitespace", "jsonl-without-text"],
)
def test_data_without_text_is_refused_by_validate(
    tmp_path: Path, write_experiment: Helper, cli: Helper, name: str, content: str, why: str
) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    path = write_corpus(tmp_path, write_experiment, name)
    done = cli("validate", path, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    (error,) = errors_of(done)
    assert re.match(rf"error: {re.escape(str(path))}:\d+: data\.paths: {re.escape(name)}: ", error)
    assert f"no text to train on ({why})" in error
    assert "Traceback" not in done.stderr


def test_plan_and_run_refuse_data_without_text_before_anything_is_written(
    tmp_path: Path, write_experiment: Helper, cli: Helper
) -> None:
    (tmp_path / "blank.txt").write_text("\n\n   \n", encoding="utf-8")
    path = write_corpus(tmp_path, write_experiment, "blank.txt")
    for command in ("plan", "run"):
        done = cli(command, path, cwd=tmp_path)
        assert done.returncode == 2, (command, done.stdout + done.stderr)
        (error,) = errors_of(done)
        assert "data.paths: blank.txt: no text to train on" in error
        assert "nothing was run or written" in done.stderr
    assert nothing_written(tmp_path)


# --------------------------------------------------------------------------------------------
# data too short for the split
# --------------------------------------------------------------------------------------------


def test_too_short_data_is_refused_exactly_where_training_would_fail(
    tmp_path: Path, write_experiment: Helper, cli: Helper
) -> None:
    """100 bytes are 101 tokens with their [EOS]: a train, a validation and a test sequence
    of 33 tokens fit (99), of 34 do not (102). The runtime's loader agrees on both sides."""
    (tmp_path / "short.txt").write_text("x" * 100, encoding="utf-8")
    path = write_corpus(tmp_path, write_experiment, "short.txt")

    fits = cli("validate", path, "--set", "training.seq_len=33", cwd=tmp_path)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    for command in ("validate", "plan", "run"):
        done = cli(command, path, "--set", "training.seq_len=34", cwd=tmp_path)
        assert done.returncode == 2, (command, done.stdout + done.stderr)
        (error,) = errors_of(done)
        assert f"{path}:" in error and "data.paths: short.txt: the corpus has 101 tokens" in error
        assert "training.seq_len=34" in error
    assert nothing_written(tmp_path)

    # Without a test split a train and a validation sequence are enough: 50 tokens each.
    no_test = ("--set", "data.test_fraction=0", "--set")
    assert cli("validate", path, *no_test, "training.seq_len=50", cwd=tmp_path).returncode == 0
    refused = cli("validate", path, *no_test, "training.seq_len=51", cwd=tmp_path)
    assert refused.returncode == 2 and "a train and a validation sequence" in refused.stderr

    from stackwise.config.base import DataConfig, TrainingConfig
    from stackwise.data import build_data

    data = DataConfig(source="files", paths=[str(tmp_path / "short.txt")])
    assert len(build_data(data, TrainingConfig(seq_len=33, batch_size=2)).train_loader) == 1
    with pytest.raises(ValueError, match="too few"):
        build_data(data, TrainingConfig(seq_len=34, batch_size=2))


def test_data_max_tokens_that_leaves_too_little_is_named(
    tmp_path: Path, write_experiment: Helper, cli: Helper
) -> None:
    (tmp_path / "long.txt").write_text("word " * 400, encoding="utf-8")
    path = write_corpus(tmp_path, write_experiment, "long.txt")
    done = cli("validate", path, "--set", "data.max_tokens=20", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    (error,) = errors_of(done)
    assert "data.max_tokens: long.txt cut to data.max_tokens=20: the corpus has 20 tokens" in error


# --------------------------------------------------------------------------------------------
# a budget that repeats the data
# --------------------------------------------------------------------------------------------

# 100 bytes, seq_len 8: 101 tokens are 12 rows; one validates, one tests, 10 train (80 tokens).
# 60 steps of 2 x 8 tokens are 960 tokens: 12 passes over the training data.
REPEATED = {"steps": 60, "train_tokens": 80, "epochs": 960 / 80}


def repeated_grid(folder: Path, write_experiment: Helper) -> Path:
    """Four runs (two learning rates, two seeds) of `REPEATED` steps on 100 bytes."""
    (folder / "tiny.txt").write_text("abcdefghij" * 10, encoding="utf-8")
    return write_corpus(
        folder,
        write_experiment,
        "tiny.txt",
        steps=REPEATED["steps"],
        grid={"training.optimizer.lr": [0.001, 0.003]},
        seeds=[0, 1],
    )


def test_a_budget_over_the_epoch_limit_warns_once_per_group_and_fails_with_strict(
    tmp_path: Path, write_experiment: Helper, cli: Helper
) -> None:
    assert REPEATED["epochs"] > MAX_EPOCHS
    path = repeated_grid(tmp_path, write_experiment)
    done = cli("validate", path, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # Four runs share the data and the budget: one warning for all of them.
    (warning,) = warnings_of(done)
    assert f"{path}:" in warning and "training.budget.steps:" in warning
    assert "(60 steps of 16 tokens)" in warning and "tiny.txt gives 80 training tokens" in warning
    assert f"{REPEATED['epochs']:.1f} times, more than {MAX_EPOCHS} epochs" in warning
    assert warning.endswith("(all 4 runs)")

    for command in ("validate", "plan", "run"):
        strict = cli(command, path, "--strict", cwd=tmp_path)
        assert strict.returncode == 2, (command, strict.stdout + strict.stderr)
        (error,) = errors_of(strict)
        assert "training.budget.steps:" in error and "(an error with --strict)" in error
    assert nothing_written(tmp_path)


@pytest.mark.slow
def test_a_run_goes_over_its_data_as_often_as_the_warning_says(
    tmp_path: Path, write_experiment: Helper, cli: Helper
) -> None:
    path = repeated_grid(tmp_path, write_experiment)
    trained = cli("run", path, "--only", "lr=0.001", "--only", "seed=0", "--quiet", cwd=tmp_path)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    (warning,) = warnings_of(trained)
    assert f"{REPEATED['epochs']:.1f} times" in warning and "80 training tokens" in warning
    from mlflow import MlflowClient

    from stackwise.tracking.store import default_tracking_uri

    client = MlflowClient(tracking_uri=default_tracking_uri(tmp_path))
    experiment = client.get_experiment_by_name("corpus")
    assert experiment is not None
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`stackwise.role` = 'point'"
    )
    assert run.data.metrics["train_corpus_tokens"] == REPEATED["train_tokens"]
    assert run.data.metrics["epochs"] == pytest.approx(REPEATED["epochs"])


def test_a_budget_within_the_limit_gives_no_warning(
    tmp_path: Path, write_experiment: Helper, cli: Helper
) -> None:
    (tmp_path / "tiny.txt").write_text("abcdefghij" * 10, encoding="utf-8")
    # 50 steps of 16 tokens over 80 training tokens: exactly 10 passes, not more.
    path = write_corpus(tmp_path, write_experiment, "tiny.txt", steps=50)
    done = cli("validate", path, "--strict", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not warnings_of(done)
    over = cli("validate", path, "--set", "training.budget.steps=51", cwd=tmp_path)
    assert over.returncode == 0 and len(warnings_of(over)) == 1, over.stderr


def test_a_bpe_run_counts_bytes_and_says_its_epochs_are_a_lower_bound(
    tmp_path: Path, write_experiment: Helper, cli: Helper
) -> None:
    (tmp_path / "tiny.txt").write_text("abcdefghij" * 10, encoding="utf-8")
    path = write_corpus(tmp_path, write_experiment, "tiny.txt", steps=60)
    done = cli("validate", path, "--set", "data.tokenizer=bpe", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (warning,) = warnings_of(done)
    assert "at least 12.0 times" in warning and "80 training bytes" in warning


# --------------------------------------------------------------------------------------------
# cheap for large corpora
# --------------------------------------------------------------------------------------------


def test_large_corpora_are_measured_by_their_file_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above `READ_LIMIT` bytes a text file counts by its size (a byte the loader cannot
    decode would read as three) and a JSONL file is not read at all (this one is not JSON);
    at most `READ_LIMIT` both are read as the loader reads them."""
    from stackwise.config.base import DataConfig
    from stackwise.data import sizes

    text = tmp_path / "latin1.txt"
    text.write_bytes(b"caf\xe9 au lait")  # not UTF-8: the loader reads 'caf\ufffd au lait'
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b" " * 100_000 + b"\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("not json\n", encoding="utf-8")
    files = [str(text), str(blank), str(broken)]
    data = DataConfig(source="files", paths=files)

    with pytest.raises(ValueError, match=r"broken\.jsonl:1: not valid JSON"):
        sizes.corpus_size(data)
    read = sizes.corpus_size(DataConfig(source="files", paths=files[:2]))
    assert read.lengths == [len("caf\ufffd au lait".encode())]

    monkeypatch.setattr(sizes, "READ_LIMIT", 1000)
    measured = sizes.corpus_size(data)
    assert measured.lengths == [text.stat().st_size]  # the blank file holds no document
    assert measured.unread_bytes == broken.stat().st_size


def test_the_data_checks_import_neither_numpy_nor_torch_where_sizes_decide(
    tmp_path: Path, write_experiment: Helper
) -> None:
    """A text file (one document: its split is known from its size) and the built-in corpus
    (many documents, a budget far below its limit) are checked without numpy or torch, which
    take seconds to import: `validate` stays fast."""
    (tmp_path / "tiny.txt").write_text("abcdefghij" * 10, encoding="utf-8")
    text = write_corpus(tmp_path, write_experiment, "tiny.txt", steps=60)
    builtin = write_experiment(
        tmp_path, "builtin", training=training(100, 32), model=MODEL, data={"source": "builtin"}
    )
    script = (
        "import json, sys\n"
        "from stackwise import preflight\n"
        "warnings = []\n"
        f"preflight.load_plans([{str(text)!r}, {str(builtin)!r}], warnings=warnings)\n"
        "heavy = sorted({'numpy', 'torch'} & set(sys.modules))\n"
        "print(json.dumps([[w.format() for w in warnings], heavy]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    warnings, heavy = json.loads(done.stdout)
    assert heavy == []
    assert len(warnings) == 1 and "tiny.txt gives 80 training tokens" in warnings[0]


def test_the_bounds_from_sizes_hold_the_split_the_run_makes() -> None:
    """`training_tokens` (no numpy) against the runtime's split over random corpora: when it
    answers, the split succeeds and its training tokens lie within the bounds (equal when it
    says exact); every split that fails is left to the split itself."""
    import random

    from stackwise.config.base import DataConfig
    from stackwise.data.packing import packed_rows, split_lengths
    from stackwise.data.sizes import CorpusSize, training_tokens

    rng = random.Random(0)
    answered = failed = 0
    for _ in range(3000):
        lengths = [rng.randint(1, rng.choice([5, 50, 500])) for _ in range(rng.randint(1, 12))]
        data = DataConfig(
            val_fraction=rng.choice([0.01, 0.05, 0.2, 0.45]),
            test_fraction=rng.choice([0.0, 0.02, 0.04]),
            split_seed=rng.randint(0, 5),
            max_tokens=rng.choice([None, rng.randint(2, 3000)]),
        )
        seq_len = rng.choice([2, 4, 8, 16, 64])
        bounds = training_tokens(CorpusSize(lengths), data, seq_len)
        try:
            split = split_lengths(
                lengths,
                val_fraction=data.val_fraction,
                seq_len=seq_len,
                seed=data.split_seed,
                max_tokens=data.max_tokens,
                test_fraction=data.test_fraction,
            )
        except ValueError:
            failed += 1
            assert bounds is None, (lengths, data, seq_len)
            continue
        if bounds is None:
            continue
        answered += 1
        exact = packed_rows(split.train, seq_len) * seq_len
        assert bounds.low <= exact <= bounds.high, (lengths, data, seq_len, bounds, exact)
        if len(lengths) == 1:
            assert bounds.low == bounds.high == exact
    assert answered > 1000 and failed > 100  # both sides were exercised
