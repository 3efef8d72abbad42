"""Where training text comes from: the built-in corpus, text files, JSONL and Parquet.

Every source yields a list of *documents* (strings) in a deterministic order; the train/validation
split and packing happen on documents (see `stackwise.data.packing`).

- ``builtin``: the English reference text that ships with CPython in ``pydoc_data.topics``
  (one document per help topic, topics in sorted order) — about 0.47 MB, no download.
- ``stdlib``: a larger offline corpus, about 12 MB on CPython 3.11: the built-in corpus followed
  by the source of the Python standard library (one document per ``.py`` file, sorted by path;
  test suites, ``idlelib``, ``turtledemo`` and installed packages left out). Code and its
  docstrings; it differs between Python versions, which the data fingerprint records.
- ``files``: paths and globs (``**`` allowed), expanded and sorted. Text files are one document
  each; JSONL (``.jsonl``/``.ndjson``/``.json``) and Parquet (``.parquet``/``.pq``) are read
  with polars and each non-null value of the text column is one document.
"""

from __future__ import annotations

import glob
import io
import json
from collections.abc import Iterator
from pathlib import Path

from stackwise.config.base import DataConfig

_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_ARROW_SUFFIXES = {".arrow"}
DATASET_STATE = "state.json"  # what `datasets.Dataset.save_to_disk` writes beside its files


def dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a folder saved with `datasets.Dataset.save_to_disk`, in the order its
    ``state.json`` lists them (the dataset's row order). Raises `ValueError` naming
    ``data.paths`` for a state file that does not list them."""
    try:
        state = json.loads((folder / DATASET_STATE).read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"data.paths: {folder}: {DATASET_STATE} does not list the dataset's files "
            f"(_data_files: {error})"
        ) from None
    files = [folder / name for name in names]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(
                f"data.paths: {folder}: {DATASET_STATE} lists {file.name}, not there"
            )
    return files


def builtin_documents() -> list[str]:
    """The help topics shipped with Python, one document each, in sorted-key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics) if topics[key].strip()]


# Folders of the standard library that are not part of the `stdlib` corpus: test suites (which
# hold deliberately malformed files), the IDE, demos and installed third-party packages.
_STDLIB_SKIP = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "turtledemo",
    "site-packages",
    "__pycache__",
}


def stdlib_files() -> list[Path]:
    """The `.py` files of the standard library in the `stdlib` corpus, sorted by relative path."""
    import os
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    # The skipped folders are not entered at all: site-packages alone can hold many times the
    # files of the library.
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _STDLIB_SKIP]
        found.extend(Path(folder, name) for name in names if name.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def stdlib_documents() -> list[str]:
    """The built-in corpus, then one document per standard-library source file."""
    documents = builtin_documents()
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            documents.append(text)
    return documents


def builtin_fingerprint(source: str) -> str:
    """sha256 (hex) of the text of the `builtin` or `stdlib` corpus (its topics, then each
    library file by its name relative to the library)."""
    import hashlib
    from pydoc_data.topics import topics

    digest = hashlib.sha256()
    for key in sorted(topics):
        digest.update(key.encode("utf-8") + b"\0" + topics[key].encode("utf-8") + b"\0")
    if source == "builtin":
        return digest.hexdigest()
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():  # names relative to the library: any install of one version
        name = path.relative_to(root).as_posix()
        digest.update(name.encode("utf-8") + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def expand_paths(patterns: list[str]) -> list[Path]:
    """Expand paths and globs to a sorted, de-duplicated list of files; a folder saved with
    `datasets.Dataset.save_to_disk` gives its Arrow files in the dataset's order."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = Path(pattern).expanduser()
        if glob.has_magic(str(expanded)):
            matches = sorted(Path(p) for p in glob.glob(str(expanded), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise FileNotFoundError(f"data.paths: no file matches {pattern!r}")
            files.extend(matches)
        elif expanded.is_file():
            files.append(expanded)
        elif (expanded / DATASET_STATE).is_file():
            files.extend(dataset_files(expanded))
        elif expanded.is_dir():
            raise FileNotFoundError(
                f"data.paths: {pattern!r} is a folder: give a glob of its files (such as "
                f"'{pattern.rstrip('/')}/*.jsonl') or a folder saved with datasets' save_to_disk"
            )
        else:
            raise FileNotFoundError(f"data.paths: {pattern!r} does not exist or is not a file")
    seen: set[Path] = set()
    unique = []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def file_format(path: Path, configured: str) -> str:
    """`text`, `jsonl` or `parquet` for `path` (from the extension when `configured` is auto)."""
    if configured != "auto":
        return configured
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix in _PARQUET_SUFFIXES:
        return "parquet"
    if suffix in _ARROW_SUFFIXES:
        return "arrow"
    return "text"


def _column_values(frame: object, column: str, path: Path) -> list[str]:
    import polars as pl

    assert isinstance(frame, pl.DataFrame)
    if column not in frame.columns:
        raise ValueError(
            f"data.text_column: {path} has no column {column!r} (columns: {', '.join(frame.columns)})"
        )
    values = frame.get_column(column).drop_nulls().cast(pl.Utf8).to_list()
    return [v for v in values if v]


def _jsonl_problem(path: Path) -> str | None:
    """`data.paths: file:line: ...` for the first line of a JSONL file that is not a JSON object
    (polars only says "Syntax at character 9")."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                return (
                    f"data.paths: {path}:{number}: not valid JSON ({error.msg} at column "
                    f"{error.colno}); each line of a JSONL file must be one JSON object"
                )
            if not isinstance(value, dict):
                return f"data.paths: {path}:{number}: each line of a JSONL file must be an object"
    return None


def read_documents(path: Path, fmt: str, text_column: str = "text") -> list[str]:
    """The documents of one file."""
    if fmt == "text":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [text] if text.strip() else []
    import polars as pl

    if fmt == "jsonl":
        try:
            frame = pl.read_ndjson(path)
        except pl.exceptions.PolarsError as error:
            raise ValueError(_jsonl_problem(path) or f"data.paths: {path}: {error}") from None
        return _column_values(frame, text_column, path)
    if fmt == "parquet":
        try:
            frame = pl.read_parquet(path)
        except pl.exceptions.PolarsError as error:
            raise ValueError(f"data.paths: {path}: not a readable Parquet file ({error})") from None
        return _column_values(frame, text_column, path)
    if fmt == "arrow":
        return list(iter_file_documents(path, fmt, text_column))
    raise ValueError(f"data.format: unknown format {fmt!r}")


def _arrow_batches(path: Path) -> Iterator[object]:
    """The record batches of an Arrow IPC file, stream format (what `datasets` writes) or file
    format, read through a memory map."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        try:
            yield from pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                yield reader.get_batch(index)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"data.paths: {path}: not a readable Arrow file ({error})") from None


def load_documents(data: DataConfig) -> list[str]:
    """All documents of the configured source, in a deterministic order."""
    if data.source == "builtin":
        return builtin_documents()
    if data.source == "stdlib":
        return stdlib_documents()
    documents: list[str] = []
    for path in expand_paths(list(data.paths)):
        documents.extend(read_documents(path, file_format(path, data.format), data.text_column))
    if not documents:
        raise ValueError("data.paths: the files contain no text")
    return documents


STREAM_CHUNK = 2 << 20  # bytes of JSONL lines (or a Parquet batch's rows) parsed at a time


def iter_file_documents(path: Path, fmt: str, text_column: str = "text") -> Iterator[str]:
    """The documents of one file, as `read_documents` gives them, a chunk at a time: JSONL in
    runs of lines of about `STREAM_CHUNK` bytes, Parquet batch by batch (memory is bounded by
    a chunk and the longest document, not by the file)."""
    if fmt == "text":
        yield from read_documents(path, fmt, text_column)
        return
    import polars as pl

    if fmt == "jsonl":
        with path.open("rb") as handle:
            while True:
                chunk = handle.readlines(STREAM_CHUNK)
                if not chunk:
                    return
                if not any(line.strip() for line in chunk):
                    continue
                try:
                    frame = pl.read_ndjson(io.BytesIO(b"".join(chunk)))
                except pl.exceptions.PolarsError as error:
                    problem = _jsonl_problem(path) or f"data.paths: {path}: {error}"
                    raise ValueError(problem) from None
                yield from _column_values(frame, text_column, path)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"data.paths: {path}: not a readable Parquet file ({error})") from None
        names = parquet.schema_arrow.names
        if text_column not in names:
            raise ValueError(
                f"data.text_column: {path} has no column {text_column!r} (columns: "
                f"{', '.join(names)})"
            )
        for batch in parquet.iter_batches(batch_size=8192, columns=[text_column]):
            table = pl.from_arrow(batch)
            assert isinstance(table, pl.DataFrame)
            yield from _column_values(table, text_column, path)
    elif fmt == "arrow":
        for batch in _arrow_batches(path):
            table = pl.from_arrow(batch)
            assert isinstance(table, pl.DataFrame)
            yield from _column_values(table, text_column, path)
    else:
        raise ValueError(f"data.format: unknown format {fmt!r}")


def iter_documents(data: DataConfig) -> Iterator[str]:
    """`load_documents` one document at a time (files read in chunks; see
    `iter_file_documents`)."""
    if data.source in ("builtin", "stdlib"):
        yield from load_documents(data)
        return
    found = False
    for path in expand_paths(list(data.paths)):
        for document in iter_file_documents(path, file_format(path, data.format), data.text_column):
            found = True
            yield document
    if not found:
        raise ValueError("data.paths: the files contain no text")
