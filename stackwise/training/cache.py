"""Activation cache of the frozen trunk during depth-wise training.

In stage k every piece before k is frozen, so its output for a given (corrupted) training sample
never changes. The trainer therefore draws a fixed *sample pool* — the micro-batches every
depth-wise stage visits, with their mlm/diffusion corruption drawn once per sample — and keeps
the frozen trunk's output for each of them here. When a stage ends, the cache is *extended*: only
the newly frozen piece runs over the cached activations (in place), so building the trunk
outputs for all stages costs one forward pass per block over the pool — linear in depth.

1. Storage is one tensor of rows ``[n_samples, T, d_model]`` (micro-batch i is a contiguous row
   range) in ``cache.dtype`` (fp32 by default, which keeps caching exact; bf16/fp16 halve it at
   the price of rounding the trunk's output).
2. It lives in one of three places (`choose_location`):

   - ``device``: on the accelerator — only when ``cache.location: device`` asks for it, since
     it takes the memory depth-wise training exists to save;
   - ``cpu``: in host memory (pinned on CUDA, for asynchronous copies);
   - ``disk``: a memory-mapped file in a ``stackwise-cache-*`` folder beside the run's
     checkpoints (or in a temporary folder), deleted when the cache is closed.

   ``auto`` keeps the cache in host memory when it fits ``max_memory_gb``, the caller's
   allowance (the trainer gives what rackwise training of the same rack would use beyond the
   depth-wise stage, `stackwise.training.memory.cache_memory_allowance`) and half the memory
   available now; otherwise it spills to disk.
3. Reads are in order. A disk cache hands each mapped range back to the kernel once it is
   copied out or written (``madvise(MADV_DONTNEED)``: the data stays in the file and the page
   cache, but not in the process's memory), and a background thread reads the next micro-batch
   ahead while the current one trains. So the process holds about two micro-batches of a
   spilled cache, whatever the pool's size.
4. On an accelerator, reads return float32 on the device: a host-side cache copies each
   micro-batch from pinned memory on a side stream, one micro-batch ahead, and the training
   stream waits for that copy only when it uses the batch.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def storage_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _available_host_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def choose_location(
    size_bytes: int,
    device: torch.device,
    requested: str,
    max_memory_gb: float,
    allowance_bytes: int | None = None,
) -> str:
    """Where a cache of `size_bytes` lives: the requested place (``device`` means the CPU when
    training on it), or for ``auto`` host memory when the cache fits ``max_memory_gb``,
    `allowance_bytes` (None: no allowance) and half the available memory, else disk."""
    if requested == "device":
        return "cpu" if device.type == "cpu" else "device"
    if requested != "auto":
        return requested
    limit = max_memory_gb * 1e9
    if allowance_bytes is not None:
        limit = min(limit, allowance_bytes)
    available = _available_host_bytes()
    if available is not None:
        limit = min(limit, available // 2)
    return "cpu" if size_bytes <= limit else "disk"


class _MappedFile:
    """A file of `size` bytes mapped into memory, whose pages can be handed back to the kernel."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        with open(path, "wb") as handle:
            handle.truncate(max(size, 1))
        self._file = open(path, "r+b")  # noqa: SIM115 - kept open for the mapping's lifetime
        self.map = mmap.mmap(self._file.fileno(), max(size, 1))
        self.size = size
        self._advise(getattr(mmap, "MADV_SEQUENTIAL", None), 0, size)

    def _advise(self, option: int | None, start: int, length: int) -> None:
        if option is None or not hasattr(self.map, "madvise") or length <= 0:
            return
        page = mmap.PAGESIZE
        begin = start // page * page
        end = min(self.size, start + length)
        with contextlib.suppress(OSError, ValueError):
            self.map.madvise(option, begin, end - begin)

    def will_need(self, start: int, length: int) -> None:
        self._advise(getattr(mmap, "MADV_WILLNEED", None), start, length)

    def release(self, start: int, length: int) -> None:
        """Drop the range's pages from the process (a shared mapping keeps their data)."""
        self._advise(getattr(mmap, "MADV_DONTNEED", None), start, length)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a tensor still viewing it: freed with it
            self.map.close()
        self._file.close()


class ActivationCache:
    """Frozen-trunk outputs of a fixed list of micro-batches (see the module docstring).

    `allowance_bytes` bounds what ``location="auto"`` may keep in host memory (None: only
    ``max_memory_gb`` and the available memory do); `directory` is where a disk cache's folder
    is made (default: the system's temporary folder).
    """

    def __init__(
        self,
        batch_rows: list[int],
        seq_len: int,
        d_model: int,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        location: str = "auto",
        max_memory_gb: float = 4.0,
        directory: str | None = None,
        allowance_bytes: int | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.offsets = [0]
        for rows in batch_rows:
            self.offsets.append(self.offsets[-1] + rows)
        n_rows = self.offsets[-1]
        shape = (n_rows, seq_len, d_model)
        self._row_bytes = seq_len * d_model * torch.empty((), dtype=dtype).element_size()
        self.size_bytes = n_rows * self._row_bytes
        self.location = choose_location(
            self.size_bytes, device, location, max_memory_gb, allowance_bytes
        )
        self._tempdir: str | None = None
        self._file: _MappedFile | None = None
        self._accelerated = device.type == "cuda"
        self._stream: Any = None
        if self._accelerated and self.location != "device":
            self._stream = torch.cuda.Stream(device)
        if self.location == "device":
            self.storage = torch.empty(shape, dtype=dtype, device=device)
        elif self.location == "cpu":
            self.storage = torch.empty(shape, dtype=dtype, pin_memory=self._accelerated)
        else:
            if directory is not None:
                os.makedirs(directory, exist_ok=True)
            self._tempdir = tempfile.mkdtemp(prefix="stackwise-cache-", dir=directory)
            self._file = _MappedFile(
                os.path.join(self._tempdir, "activations.bin"), self.size_bytes
            )
            flat = torch.frombuffer(self._file.map, dtype=dtype, count=n_rows * seq_len * d_model)
            self.storage = flat.view(shape)
        # One micro-batch read ahead: (index, future of its tensor, CUDA event or None).
        self._ahead: tuple[int, Future[tuple[torch.Tensor, Any]]] | None = None
        self._reader: ThreadPoolExecutor | None = None
        if self.location == "disk":
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stackwise-cache")
        # Number of blocks the cached activations have gone through (embedding = 0 blocks).
        self.prefix_end = 0
        self.filled = False

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def memory_bytes(self) -> int:
        """Bytes held in RAM or on the device: the whole cache, or for a disk cache its
        read-ahead (the micro-batch in use and the next, in float32)."""
        if self.location != "disk":
            return self.size_bytes
        largest = max(
            (b - a for a, b in zip(self.offsets, self.offsets[1:], strict=False)), default=0
        )
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * largest * self._row_bytes * 4 // element

    @property
    def disk_bytes(self) -> int:
        """Bytes in the memory-mapped file (0 unless on disk)."""
        return self.size_bytes if self.location == "disk" else 0

    # -- reading ---------------------------------------------------------------------------

    def _range(self, index: int) -> tuple[int, int]:
        start, end = (
            self.offsets[index] * self._row_bytes,
            self.offsets[index + 1] * self._row_bytes,
        )
        return start, end - start

    def _host_buffer(self, index: int) -> torch.Tensor | None:
        """Where a disk cache copies micro-batch `index` out of the file: allocated by the
        calling (training) thread, so the reader thread allocates nothing of its own."""
        if self._file is None:
            return None
        shape = (self.offsets[index + 1] - self.offsets[index], *self.storage.shape[1:])
        if self._accelerated:
            return torch.empty(shape, dtype=self.dtype, pin_memory=True)
        return torch.empty(shape, dtype=torch.float32)

    def _load(self, index: int, host: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """Micro-batch `index` as the caller gets it, and the CUDA event its copy is waited on
        by (None when it is ready). Runs on the reader thread for a disk cache."""
        rows = self.storage[self.offsets[index] : self.offsets[index + 1]]
        if self._file is not None:
            assert host is not None
            start, length = self._range(index)
            self._file.will_need(start, length)
            host.copy_(rows)
            self._file.release(start, length)
            rows = host
        if not self._accelerated or self.location == "device":
            return rows.to(self.device).to(torch.float32), None
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            moved = rows.to(self.device, non_blocking=True).to(torch.float32)
            event = torch.cuda.Event()
            event.record(self._stream)
        return moved, event

    def _start(self, index: int) -> Future[tuple[torch.Tensor, Any]]:
        if self._reader is not None:
            return self._reader.submit(self._load, index, self._host_buffer(index))
        done: Future[tuple[torch.Tensor, Any]] = Future()
        done.set_result(self._load(index, None))
        return done

    def read(self, index: int) -> torch.Tensor:
        """Cached activations of micro-batch `index`, float32 on the training device.

        Reading ahead (the next micro-batch) happens where it can overlap the caller's work: on
        a thread for a disk cache, as an asynchronous copy on an accelerator.
        """
        ahead = self._ahead
        self._ahead = None
        if ahead is not None and ahead[0] == index:
            tensor, event = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].result()  # never leave a read running behind a write
            tensor, event = self._load(index, self._host_buffer(index))
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            tensor.record_stream(current)
        if (self._reader is not None or event is not None) and index + 1 < len(self):
            self._ahead = (index + 1, self._start(index + 1))
        return tensor

    # -- writing ---------------------------------------------------------------------------

    def write(self, index: int, hidden: torch.Tensor) -> None:
        ahead = self._ahead
        if ahead is not None:
            ahead[1].result()
            if ahead[0] == index:  # read before this write: stale
                self._ahead = None
        target = self.storage[self.offsets[index] : self.offsets[index + 1]]
        target.copy_(hidden.detach().to(self.dtype))
        if self._file is not None:
            self._file.release(*self._range(index))

    @torch.no_grad()
    def fill(self, compute: Callable[[int], torch.Tensor], prefix_end: int) -> None:
        """Store ``compute(i)`` for every micro-batch: the trunk output through `prefix_end`."""
        for index in range(len(self)):
            self.write(index, compute(index))
        self.prefix_end = prefix_end
        self.filled = True

    @torch.no_grad()
    def extend(self, apply: Callable[[torch.Tensor, int], torch.Tensor], prefix_end: int) -> None:
        """Replace every entry h_i by ``apply(h_i, i)``: run newly frozen blocks in place."""
        for index in range(len(self)):
            self.write(index, apply(self.read(index), index))
        self.prefix_end = prefix_end

    def close(self) -> None:
        """Release the storage (and delete the disk file)."""
        if self._ahead is not None:
            with contextlib.suppress(Exception):
                self._ahead[1].result()
            self._ahead = None
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None
        self.storage = torch.empty(0)
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __del__(self) -> None:
        if getattr(self, "_tempdir", None) is not None:
            self.close()
