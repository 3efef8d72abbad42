"""What makes two tracked runs the same run: its config, its data's content, its device.

`stackwise run` skips a grid point that already has a FINISHED run and resumes one that was
interrupted; both look the point up by its identity, computed here in four steps:

1. `StackWiseConfig.config_hash` hashes every setting that can change the result and none that
   cannot (`stackwise.config.base.NOT_IDENTITY`: where runs are recorded, checkpoint and log
   cadence, where the activation cache lives). It needs no data and no torch.
2. `resolve_data_paths` makes relative `data.paths` absolute against the experiment file's
   folder, so a file means the same data whatever the working folder.
3. `data_fingerprint` hashes what those paths hold: per file its size, sha256 and the format it
   is read as (the built-in corpus: its text; a prepared folder: its manifest's digest). File
   hashes are cached by path, size, modification time, inode and status-change time (ctime) in
   a small JSON file, so an unchanged corpus is read once; an edit that keeps the size and restores the modification time (`cp -p`,
   `rsync -t`, `tar`) still changes the ctime, which no user can set back.
4. `run_identity` combines the identity settings (with `data.paths` replaced by the fingerprint
   and `training.device` by the device *type* it resolves to, where `training.precision` only
   counts on CUDA: CPU and MPS train in fp32) into a 16-hex-digit hash.

The same experiment file run from another folder with other data is another run; changing only
checkpoint or log cadence, `device: auto` versus the device it picks, or the cache location is
not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stackwise.config.base import DataConfig, StackWiseConfig

CHUNK = 1 << 20


def resolve_data_pattern(pattern: str, base: Path) -> str:
    """`pattern` (a path or glob of `data.paths`) as an absolute pattern: ``~`` expanded, a
    relative one joined to `base` (the experiment file's folder)."""
    expanded = os.path.expanduser(pattern)
    if os.path.isabs(expanded):
        return expanded
    return str(base / expanded)


def resolve_data_paths(config: StackWiseConfig, base: Path) -> StackWiseConfig:
    """`config` with its `data.paths` and `data.tokenizer_file` resolved against `base` (a copy
    when anything changes)."""
    paths = [resolve_data_pattern(p, base) for p in config.data.paths]
    file = config.data.tokenizer_file
    tokenizer_file = None if file is None else resolve_data_pattern(file, base)
    if paths == config.data.paths and tokenizer_file == file:
        return config
    resolved = config.model_copy(deep=True)
    resolved.data.paths = paths
    resolved.data.tokenizer_file = tokenizer_file
    return resolved


class FingerprintCache:
    """sha256 of files by (absolute path, size, mtime, inode, ctime), kept in a JSON file
    between runs.

    A missing or unreadable cache file is an empty cache; writes go through a temporary file
    and a rename, so concurrent processes at worst recompute a hash.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.changed = False
        if path is not None:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict):
                    self.entries = {k: v for k, v in data.items() if isinstance(v, dict)}

    def sha256(self, file: Path) -> tuple[int, str]:
        """(size, sha256 hex) of `file`, from the cache when size, mtime, inode and ctime all
        still match (anything else: hashed again)."""
        key = str(file.resolve())
        stat = file.stat()
        entry = self.entries.get(key)
        if (
            entry
            and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
            and entry.get("inode") == stat.st_ino
            and entry.get("ctime_ns") == stat.st_ctime_ns
        ):
            return stat.st_size, str(entry["sha256"])
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        self.entries[key] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "inode": stat.st_ino,
            "ctime_ns": stat.st_ctime_ns,
            "sha256": digest.hexdigest(),
        }
        self.changed = True
        return stat.st_size, digest.hexdigest()

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".fingerprints-")
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(self.entries, out, indent=0, sort_keys=True)
            os.replace(temp, self.path)
            self.changed = False


def data_fingerprint(data: DataConfig, cache: FingerprintCache | None = None) -> str:
    """sha256 (hex) of the content a data config reads: per file its format, size and sha256,
    in reading order (the built-in corpus: its text). `data.paths` must already be resolved.
    A prepared corpus is not read: its fingerprint is its manifest's digest."""
    if data.source == "prepared":
        from stackwise.data.prepared import prepared_fingerprint

        return prepared_fingerprint(data)
    cache = cache or FingerprintCache(None)
    if data.source in ("builtin", "stdlib"):
        from stackwise.data.sources import builtin_fingerprint

        corpus = builtin_fingerprint(data.source)
    else:
        from stackwise.data.sources import expand_paths, file_format

        files: list[list[Any]] = []
        for path in expand_paths(list(data.paths)):
            size, sha = cache.sha256(path)
            files.append([file_format(path, data.format), size, sha])
        corpus = _digest(files, 64)
    if data.tokenizer_file is None or data.tokenizer != "hf":
        cache.save()
        return corpus
    # A tokenizer file is part of what the run reads: its content, not its path.
    size, sha = cache.sha256(Path(data.tokenizer_file))
    cache.save()
    return _digest([corpus, ["tokenizer", size, sha]], 64)


def run_identity(config: StackWiseConfig, device_type: str, fingerprint: str) -> str:
    """The identity of a tracked run (16 hex digits; the ``config_hash`` tag of its MLflow run)."""
    payload = config.identity_dict()
    payload["data"].pop("paths", None)
    payload["data"].pop("tokenizer_file", None)  # its content is in the fingerprint
    payload["training"].pop("device", None)
    if device_type != "cuda":  # the trainer autocasts on CUDA only
        payload["training"].pop("precision", None)
    return _digest({"config": payload, "device": device_type, "data": fingerprint}, 16)


def _digest(value: Sequence[Any] | dict[str, Any], length: int) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:length]
