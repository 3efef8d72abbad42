"""`stackwise data …`: commands on training data.

`stackwise data prepare CONFIG_OR_FILE -o DIR` tokenizes a corpus once into memory-mapped token
shards with a manifest (`stackwise.data.prepared.prepare`); a run then reads it with
``data: {source: prepared, paths: [DIR]}``. Given an experiment (or run config) file, the
corpus, tokenizer and split settings are its ``data`` section (with relative paths taken from
the file's folder) and the split is checked against its ``training.seq_len``; given data files
or globs, the defaults of a ``files`` source with ``--tokenizer`` (and ``--tokenizer-file`` for
a Hugging Face ``tokenizer.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise.cli.output import fail, load_plans, note, stderr_console, user_errors
from stackwise.config.base import DataConfig, TrainingConfig

data_app = typer.Typer(
    name="data",
    help="Prepare training data: tokenize once into memory-mapped shards.",
    no_args_is_help=True,
)

_CONFIG_SUFFIXES = {".yaml", ".yml"}


def _from_files(
    sources: list[str], tokenizer: str, tokenizer_file: Path | None, seq_len: int | None
) -> tuple[DataConfig, int]:
    if tokenizer not in ("byte", "bpe", "hf"):
        fail([f"--tokenizer: {tokenizer!r} is not a tokenizer; use byte, bpe or hf"])
    if (tokenizer == "hf") != (tokenizer_file is not None):
        fail(["--tokenizer-file: give it with --tokenizer hf, and only then"])
    if tokenizer_file is not None and not tokenizer_file.expanduser().is_file():
        fail([f"--tokenizer-file: {tokenizer_file} does not exist or is not a file"])
    data = DataConfig(
        source="files",
        paths=[str(Path(p).expanduser().absolute()) for p in sources],
        tokenizer=tokenizer,  # checked above
        tokenizer_file=None
        if tokenizer_file is None
        else str(tokenizer_file.expanduser().absolute()),
    )
    return data, seq_len or TrainingConfig().seq_len


def _from_config(file: str, seq_len: int | None) -> tuple[DataConfig, int]:
    from stackwise.identity import resolve_data_paths

    with user_errors():
        plans = load_plans([file], [], [], None, memory_check=False)
    found: dict[str, DataConfig] = {}
    lengths: list[int] = []
    for experiment, runs in plans:
        base = experiment.path.resolve().parent
        for spec in runs:
            data = resolve_data_paths(spec.config, base).data
            found[data.model_dump_json()] = data
            lengths.append(spec.config.training.seq_len)
    if len(found) != 1:
        fail(
            [
                f"{file}: data: the runs of this file read {len(found)} different corpora; "
                f"prepare each from a file whose runs share one data section"
            ]
        )
    return next(iter(found.values())), seq_len or max(lengths)


def prepare(
    source: Annotated[
        list[str],
        typer.Argument(
            help="An experiment or run config file (its data section is prepared), or data "
            "files and globs (text, JSONL, Parquet).",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Folder for the shards and manifest.json."),
    ],
    tokenizer: Annotated[
        str,
        typer.Option(
            "--tokenizer", help="For data files: byte, bpe or hf (a config says its own)."
        ),
    ] = "byte",
    tokenizer_file: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer-file",
            help="For data files with --tokenizer hf: a local Hugging Face tokenizer.json.",
            show_default=False,
        ),
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len",
            min=1,
            help="Sequence length the split must give each side one sequence of (default: the "
            "config's training.seq_len, its largest over a grid).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Prepare again even when nothing changed.")
    ] = False,
) -> None:
    """Tokenize a corpus once into memory-mapped token shards with a manifest; train on it
    with data.source: prepared and data.paths: [the folder]."""
    from stackwise.data.prepared import prepare as prepare_folder

    if len(source) == 1 and Path(source[0]).suffix.lower() in _CONFIG_SUFFIXES:
        data, length = _from_config(source[0], seq_len)
    else:
        data, length = _from_files(source, tokenizer, tokenizer_file, seq_len)
    console = stderr_console()
    try:
        done = prepare_folder(data, length, output, progress=console.print, force=force)
    except (ValueError, FileNotFoundError, OSError) as error:
        fail([str(error)])
    manifest = done.manifest
    sides = ", ".join(f"{name} {side['tokens']:,}" for name, side in manifest["sides"].items())
    if not done.written:
        note(f"{output}: already prepared ({done.reason}); nothing to do")
        return
    seconds = max(done.seconds, 1e-9)
    total = sum(side["tokens"] for side in manifest["sides"].values())
    console.print(
        f"prepared {output} ({done.reason}): {total:,} {manifest['dtype']} tokens ({sides}) "
        f"from {done.source_bytes / 1e6:,.1f} MB in {done.seconds:.1f} s "
        f"({done.source_bytes / 1e6 / seconds:,.1f} MB/s, {total / seconds:,.0f} tokens/s)"
    )


data_app.command()(prepare)
