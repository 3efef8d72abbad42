"""A corpus tokenized once into memory-mapped token shards, and loaders that stream from them.

`prepare(data, seq_len, folder)` (the command ``stackwise data prepare``) reads the configured
sources one document at a time, decides the train/validation/test split exactly as the in-memory
path does (`stackwise.data.bundle.split_and_tokenize`: on UTF-8 bytes, with ``data.split_seed``,
``max_tokens`` and the fractions, a BPE trained on the training side only), tokenizes each side
in batches and writes it as one flat file of tokens — every document (or piece of one) followed
by [EOS], in the split's order — so that its rows of ``seq_len`` tokens are the rows `pack`
makes. The folder holds:

- ``train.bin``, ``val.bin``, ``test.bin``: the token streams (``uint16`` when the vocabulary
  fits, else ``uint32``), read with `numpy.memmap`;
- ``<side>.offsets.npy``: where each document starts in its stream (one more entry: the end);
- ``tokenizer.json`` for a BPE (the byte tokenizer needs no file);
- ``manifest.json``: format version, tokenizer, token type, the settings the split used, every
  source (path, size, modification time, sha256), per side its tokens, documents and sha256,
  and ``digest``, the sha256 of all that content, which is the data fingerprint of a run that
  trains on the folder (no corpus is hashed again per run).

Memory stays bounded while preparing: the documents' UTF-8 bytes are first written to a
temporary file in reading order (only their positions kept), the split is drawn on the
lengths, and each side is then copied (byte tokenizer) or encoded in batches (BPE) from that
file, a batch at a time. Preparing again with unchanged sources and settings does
nothing; a source whose size, modification time or content changed is prepared again.

`load_prepared` gives a run's tokenizer and loaders: `SequenceLoader` over the memory-mapped
rows, so a batch reads only its own rows (the training order, a permutation of
the rows drawn from ``training.seed`` + epoch as for an in-memory corpus, takes 4 bytes per
row). `read_manifest` (no numpy) checks a folder for the pre-run checks and the run identity.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from stackwise.config.base import DataConfig, TrainingConfig

if TYPE_CHECKING:
    import numpy as np

    from stackwise.data.loader import SequenceLoader
    from stackwise.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SIDES = ("train", "val", "test")
_BYTES_FILE = ".documents.tmp"
_BATCH_BYTES = 4 << 20  # text encoded per batch
_HASH_CHUNK = 1 << 20

# Settings of `data` that decide the prepared tokens (the source itself is in "sources").
_SETTINGS = (
    "source",
    "format",
    "text_column",
    "tokenizer",
    "bpe_vocab_size",
    "tokenizer_file",
    "val_fraction",
    "test_fraction",
    "split_seed",
    "max_tokens",
)


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned type that holds every token id: ``uint16`` or ``uint32``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _itemsize(dtype: str) -> int:
    return {"uint16": 2, "uint32": 4}[dtype]


# -- reading a manifest (no numpy: the pre-run checks and the run identity use it) -------------


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a prepared folder, checked against its shards (each present, of the
    size its token count gives). Raises `ValueError` naming ``data.paths`` and what is wrong."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ValueError(
            f"data.paths: {folder} is not a folder; write one with `stackwise data prepare`"
        )
    if not path.is_file():
        raise ValueError(
            f"data.paths: {folder} has no {MANIFEST}; write it with `stackwise data prepare`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"data.paths: {path} is not valid JSON ({error})") from None
    problem = _manifest_problem(folder, manifest)
    if problem:
        raise ValueError(f"data.paths: {path}: {problem}; prepare the folder again")
    return cast(dict[str, Any], manifest)


def _manifest_problem(folder: Path, manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "not a manifest (a JSON object is expected)"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"format_version is {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
    for key in ("digest", "dtype", "tokenizer", "sides", "settings", "sources"):
        if key not in manifest:
            return f"no {key!r} entry"
    if manifest["dtype"] not in ("uint16", "uint32"):
        return f"dtype {manifest['dtype']!r} is not uint16 or uint32"
    tokenizer = manifest["tokenizer"]
    if not isinstance(tokenizer, dict) or tokenizer.get("kind") not in ("byte", "bpe", "hf"):
        return "tokenizer.kind must be byte, bpe or hf"
    if tokenizer["kind"] != "byte" and not (folder / TOKENIZER_FILE).is_file():
        return f"the tokenizer file {TOKENIZER_FILE} is missing"
    sides = manifest["sides"]
    if not isinstance(sides, dict) or "train" not in sides or "val" not in sides:
        return "sides must hold train and val"
    for name, side in sides.items():
        if not isinstance(side, dict) or not isinstance(side.get("tokens"), int):
            return f"sides.{name}.tokens must be a number"
        shard = folder / f"{name}.bin"
        if not shard.is_file():
            return f"the shard {shard.name} is missing"
        size = shard.stat().st_size
        if size != side["tokens"] * _itemsize(manifest["dtype"]):
            return (
                f"the shard {shard.name} holds {size} bytes, not the {side['tokens']} "
                f"{manifest['dtype']} tokens of sides.{name}.tokens"
            )
    return None


def prepared_fingerprint(data: DataConfig) -> str:
    """The data fingerprint of a run on a prepared folder: its manifest's digest."""
    return str(read_manifest(data.paths[0])["digest"])


# -- preparing ------------------------------------------------------------------------------


class _Span:
    """Bytes ``[start, stop)`` of the documents file: what `split_documents` splits (it needs
    only `len` and slices), so the split of a corpus is drawn without its text in memory."""

    __slots__ = ("start", "stop")

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key: slice) -> _Span:
        start, stop, _ = key.indices(len(self))
        return _Span(self.start + start, self.start + max(start, stop))


@dataclass
class Prepared:
    """What `prepare` did: the manifest, and whether it wrote anything."""

    manifest: dict[str, Any]
    written: bool
    reason: str  # why it was (or was not) prepared
    source_bytes: int = 0
    seconds: float = 0.0


def _settings(data: DataConfig, seq_len: int) -> dict[str, Any]:
    settings = {key: getattr(data, key) for key in _SETTINGS}
    settings["seq_len"] = seq_len  # the split's check that every side gets a sequence
    # A tokenizer file counts by its content (the manifest keeps where it was read from).
    file = settings.pop("tokenizer_file", None)
    settings["tokenizer_file_sha256"] = None if file is None else _sha256(Path(file))
    return settings


def _source_stats(data: DataConfig) -> list[dict[str, Any]]:
    """Every source file by path, format, size and modification time; the built-in corpora by
    name."""
    if data.source in ("builtin", "stdlib"):
        return [{"path": f"<{data.source}>"}]
    from stackwise.data.sources import expand_paths, file_format

    stats = []
    for path in expand_paths(list(data.paths)):
        stat = path.stat()
        stats.append(
            {
                "path": str(path.resolve()),
                "format": file_format(path, data.format),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            }
        )
    return stats


def _with_hashes(data: DataConfig, stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if data.source in ("builtin", "stdlib"):
        from stackwise.data.sources import builtin_fingerprint

        return [{**stats[0], "sha256": builtin_fingerprint(data.source)}]
    return [{**stat, "sha256": _sha256(Path(stat["path"]))} for stat in stats]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _content(sources: list[dict[str, Any]]) -> list[list[Any]]:
    """What of the sources decides the tokens: format, size and hash (not where they lie)."""
    return [[s.get("format"), s.get("size"), s["sha256"]] for s in sources]


def _digest(manifest: dict[str, Any]) -> str:
    payload = {
        "format_version": manifest["format_version"],
        "settings": manifest["settings"],
        "sources": _content(manifest["sources"]),
        "tokenizer": manifest["tokenizer"],
        "dtype": manifest["dtype"],
        "sides": {name: [s["tokens"], s["sha256"]] for name, s in manifest["sides"].items()},
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _existing(folder: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(folder)
    except ValueError:
        return None


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    temp = folder / f".{MANIFEST}.tmp"
    temp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temp, folder / MANIFEST)


def prepare(
    data: DataConfig,
    seq_len: int,
    folder: str | Path,
    *,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> Prepared:
    """Tokenize the sources of `data` into shards in `folder` (see the module doc). `seq_len`
    is the training sequence length the split must give every side one sequence of. Does
    nothing when `folder` already holds these sources (same size and modification time, or
    same content) prepared with these settings, unless `force`. Raises `ValueError` (and
    `FileNotFoundError`) naming the ``data.`` field for sources it cannot read."""
    if data.source == "prepared":
        raise ValueError("data.source: `prepared` data is already prepared; give its sources")
    folder = Path(folder)
    settings = _settings(data, seq_len)
    stats = _source_stats(data)
    old = None if force else _existing(folder)
    reason = "no prepared data in the folder"
    if old is not None:
        same_settings = old["settings"] == settings
        old_stats = [{k: s.get(k) for k in ("path", "format", "size", "mtime_ns")} for s in stats]
        kept = [
            {k: s.get(k) for k in ("path", "format", "size", "mtime_ns")} for s in old["sources"]
        ]
        if same_settings and old_stats == kept and data.source == "files":
            return Prepared(old, False, "sources and settings unchanged")
        sources = _with_hashes(data, stats)
        if same_settings and _content(sources) == _content(old["sources"]):
            if sources != old["sources"]:  # touched, not changed: remember the new times
                old["sources"] = sources
                _write_manifest(folder, old)
            return Prepared(old, False, "sources and settings unchanged")
        reason = "the settings changed" if not same_settings else "the sources changed"
    else:
        sources = _with_hashes(data, stats)
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # a half-written folder is not prepared
    manifest, source_bytes = _prepare(data, seq_len, folder, sources, progress)
    manifest["settings"] = settings
    manifest["digest"] = _digest(manifest)
    _write_manifest(folder, manifest)
    return Prepared(manifest, True, reason, source_bytes, time.perf_counter() - started)


AUTO_FOLDER = "prepared"  # beside a store: the folders `auto_prepare` writes


def auto_prepare(
    data: DataConfig,
    seq_len: int,
    root: Path,
    report: Callable[[str], None] | None = None,
) -> DataConfig | None:
    """The data config that reads `data`'s files from token shards, prepared once into
    ``root/prepared/<key>`` (`key`: the files and the settings), when the files (source
    `files`) hold more than ``data.prepare_above_mb`` MB; None when they are read into memory.
    The rows are those of the in-memory path. Processes preparing the same folder take turns
    (a lock file beside it): the first prepares, the others find it prepared. `report` hears
    the progress and, when it was prepared now, one line on what happened and how to do it
    ahead of time."""
    if data.source != "files" or data.prepare_above_mb is None:
        return None
    import fcntl

    from stackwise.data.sources import expand_paths

    files = expand_paths(list(data.paths))
    size = sum(file.stat().st_size for file in files)
    if size <= data.prepare_above_mb * 1e6:
        return None
    what = {"files": [str(f.resolve()) for f in files], "settings": _settings(data, seq_len)}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    folder = root / AUTO_FOLDER / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f"{key}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        done = prepare(data, seq_len, folder, progress=report)
    if done.written and report is not None:
        tokens = sum(side["tokens"] for side in done.manifest["sides"].values())
        report(
            f"data: {size / 1e6:,.0f} MB of files, above data.prepare_above_mb="
            f"{data.prepare_above_mb:g}: tokenized once into {folder} ({tokens:,} tokens, "
            f"{done.seconds:.0f} s); runs of these files and settings read it from there. Ahead "
            f"of time: `stackwise data prepare EXPERIMENT.yaml -o DIR`, then data: "
            f"{{source: prepared, paths: [DIR]}}"
        )
    return DataConfig(source="prepared", paths=[str(folder)])


class _Progress:
    """One line every `every` seconds: bytes and tokens done, and their rates."""

    def __init__(self, report: Callable[[str], None] | None, every: float = 2.0) -> None:
        self.report, self.every = report, every
        self.started = self.last = time.perf_counter()

    def __call__(self, what: str, done_bytes: int, tokens: int, force: bool = False) -> None:
        now = time.perf_counter()
        if self.report is None or (not force and now - self.last < self.every):
            return
        self.last = now
        seconds = max(now - self.started, 1e-9)
        self.report(
            f"{what}: {done_bytes / 1e6:,.1f} MB, {tokens:,} tokens "
            f"({done_bytes / 1e6 / seconds:,.1f} MB/s, {tokens / seconds:,.0f} tokens/s)"
        )


def _prepare(
    data: DataConfig,
    seq_len: int,
    folder: Path,
    sources: list[dict[str, Any]],
    report: Callable[[str], None] | None,
) -> tuple[dict[str, Any], int]:

    from stackwise.data.packing import split_documents
    from stackwise.data.sources import iter_documents

    progress = _Progress(report)
    spans: list[_Span] = []
    position = 0
    documents_file = folder / _BYTES_FILE
    text: _Documents | None = None
    try:
        with documents_file.open("wb") as out:
            for document in iter_documents(data):
                encoded = document.encode("utf-8")
                out.write(encoded)
                spans.append(_Span(position, position + len(encoded)))
                position += len(encoded)
                progress("read", position, 0)
        if not position:
            raise ValueError("data.paths: the files contain no text")
        text = _Documents(documents_file)

        def split(min_val_tokens: int = 0) -> Any:
            return split_documents(
                cast("list[np.ndarray]", spans),
                val_fraction=data.val_fraction,
                seq_len=seq_len,
                seed=data.split_seed,
                max_tokens=data.max_tokens,
                min_val_tokens=min_val_tokens,
                test_fraction=data.test_fraction,
            )

        pieces = split()
        written = _Progress(report)
        for attempt in range(2):
            tokenizer = _tokenizer(data, text, pieces.train)
            dtype = token_dtype(tokenizer.vocab_size)
            sides = {"train": pieces.train, "val": pieces.val}
            if data.test_fraction > 0:
                sides["test"] = pieces.test
            counts = {
                name: _write_side(folder, name, text, side, tokenizer, dtype, written)
                for name, side in sides.items()
            }
            rows = {name: count["tokens"] // seq_len for name, count in counts.items()}
            if all(rows.values()) or data.tokenizer == "byte" or attempt == 1:
                break
            # As the in-memory path: hold out (positionally) enough bytes for one sequence of
            # BPE tokens, with margin.
            train_bytes = sum(len(piece) for piece in pieces.train)
            per_token = train_bytes / max(1, counts["train"]["tokens"])
            pieces = split(math.ceil(1.25 * seq_len * per_token))
        if not all(rows.values()):
            names = "a train, a validation and a test" if "test" in sides else "a train and a"
            raise ValueError(
                f"data: after tokenization the corpus has too few tokens for {names} "
                f"sequence of training.seq_len={seq_len} tokens; add text, raise "
                f"data.max_tokens or lower training.seq_len"
            )
        for name in SIDES:
            if name not in sides:
                (folder / f"{name}.bin").unlink(missing_ok=True)
                (folder / f"{name}.offsets.npy").unlink(missing_ok=True)
        total = sum(count["tokens"] for count in counts.values())
        written("wrote", position, total, force=True)
    finally:
        if text is not None:
            text.close()
        documents_file.unlink(missing_ok=True)
    from stackwise.data.tokenizer import BPETokenizer

    saved = isinstance(tokenizer, BPETokenizer)
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save(folder / TOKENIZER_FILE)
    else:
        (folder / TOKENIZER_FILE).unlink(missing_ok=True)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {
            "kind": data.tokenizer,
            "file": TOKENIZER_FILE if saved else None,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "sha256": _sha256(folder / TOKENIZER_FILE) if saved else None,
        },
        "dtype": dtype,
        "sources": sources,
        "split": {"by_document": pieces.by_document, "corpus_bytes": pieces.corpus_tokens},
        "sides": counts,
    }
    return manifest, position


class _Documents:
    """The documents' UTF-8 bytes in reading order, read a span at a time (``pread``: nothing
    of the file stays in this process's memory)."""

    def __init__(self, path: Path) -> None:
        self.handle = path.open("rb")

    def read(self, span: _Span) -> bytes:
        return os.pread(self.handle.fileno(), len(span), span.start)

    def close(self) -> None:
        self.handle.close()


def _as_text(text: _Documents, span: _Span) -> str:
    # A piece cut inside a multi-byte character loses that character on both sides (as the
    # in-memory path's split does).
    return text.read(span).decode("utf-8", errors="ignore")


def _tokenizer(data: DataConfig, text: _Documents, train: list[_Span]) -> Tokenizer:
    from stackwise.data.tokenizer import BPETokenizer, ByteTokenizer

    if data.tokenizer == "byte":
        return ByteTokenizer()
    if data.tokenizer == "hf":
        assert data.tokenizer_file is not None  # the config's check
        return BPETokenizer.from_file(data.tokenizer_file)
    texts = (_as_text(text, span) for span in train)
    return BPETokenizer.train(texts, data.bpe_vocab_size)


def _batches(spans: list[_Span]) -> Iterator[list[_Span]]:
    batch: list[_Span] = []
    size = 0
    for span in spans:
        batch.append(span)
        size += len(span)
        if size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_side(
    folder: Path,
    name: str,
    text: _Documents,
    spans: list[_Span],
    tokenizer: Tokenizer,
    dtype: str,
    progress: _Progress,
) -> dict[str, Any]:
    """Write one side's token stream (each piece, then [EOS]) and its document offsets."""
    import numpy as np

    from stackwise.data.tokenizer import BPETokenizer

    eos = np.array([tokenizer.eos_id], dtype=dtype)
    offsets = np.zeros(len(spans) + 1, dtype=np.int64)
    digest = hashlib.sha256()
    tokens = 0
    done = 0
    index = 0
    with (folder / f"{name}.bin").open("wb") as out:
        for batch in _batches(spans):
            if isinstance(tokenizer, BPETokenizer):
                encoded = [
                    np.asarray(ids, dtype=dtype)
                    for ids in tokenizer.encode_batch([_as_text(text, s) for s in batch])
                ]
            else:  # the byte tokenizer: tokens are the bytes
                encoded = [np.frombuffer(text.read(s), dtype=np.uint8).astype(dtype) for s in batch]
            for ids in encoded:
                piece = np.concatenate([ids, eos]).tobytes()
                out.write(piece)
                digest.update(piece)
                tokens += len(ids) + 1
                index += 1
                offsets[index] = tokens
            done += sum(len(s) for s in batch)
            progress(f"tokenized {name}", done, tokens)
    np.save(folder / f"{name}.offsets.npy", offsets)
    return {"tokens": tokens, "documents": len(spans), "sha256": digest.hexdigest()}


# -- reading --------------------------------------------------------------------------------


def prepared_tokenizer(folder: Path, manifest: dict[str, Any]) -> Tokenizer:
    from stackwise.data.tokenizer import BPETokenizer, ByteTokenizer

    if manifest["tokenizer"]["kind"] != "byte":
        return BPETokenizer.load(folder / TOKENIZER_FILE)
    return ByteTokenizer()


def side_rows(folder: Path, manifest: dict[str, Any], name: str, seq_len: int) -> np.ndarray:
    """The rows of `seq_len` tokens of one side, memory-mapped (read-only, nothing loaded)."""
    import numpy as np

    rows = manifest["sides"][name]["tokens"] // seq_len
    if rows < 1:
        raise ValueError(
            f"training.seq_len: the prepared {name} side of {folder} holds "
            f"{manifest['sides'][name]['tokens']} tokens, fewer than one sequence of {seq_len}; "
            f"lower training.seq_len or prepare more text"
        )
    return np.memmap(
        folder / f"{name}.bin", dtype=manifest["dtype"], mode="r", shape=(rows, seq_len)
    )


def load_prepared(
    data: DataConfig, training: TrainingConfig
) -> tuple[Tokenizer, SequenceLoader, SequenceLoader, SequenceLoader | None]:
    """The tokenizer and the train, validation and test loaders (test: None without a test
    side) of a prepared folder (``data.paths[0]``), over memory-mapped rows of
    ``training.seq_len`` tokens (see the module doc)."""
    from stackwise.data.loader import SequenceLoader

    folder = Path(data.paths[0])
    manifest = read_manifest(folder)
    seq_len, batch = training.seq_len, training.batch_size
    train = SequenceLoader(
        side_rows(folder, manifest, "train", seq_len),
        batch,
        shuffle=True,
        seed=training.seed,
        drop_last=True,
    )
    val = SequenceLoader(
        side_rows(folder, manifest, "val", seq_len), batch, shuffle=False, drop_last=False
    )
    test = None
    if "test" in manifest["sides"]:
        rows = side_rows(folder, manifest, "test", seq_len)
        test = SequenceLoader(rows, batch, shuffle=False, drop_last=False)
    return prepared_tokenizer(folder, manifest), train, val, test
