"""Activation cache of the frozen trunk during depth-wise training.

In stage k every piece before k is frozen, so its output for a given (corrupted) training sample
never changes. The trainer therefore draws a fixed *sample pool* — the micro-batches every
depth-wise stage visits, with their mlm/diffusion corruption drawn once per sample — and keeps
the frozen trunk's output for each of them here. When a stage ends, the cache is *extended*: only
the newly frozen piece runs over the cached activations (in place), so building the trunk
outputs for all stages costs one forward pass per block over the pool — linear in depth.

Storage is one tensor of rows ``[n_samples, T, d_model]`` (micro-batch i is a contiguous row
range), in one of three places, chosen by `choose_location` when the config says ``auto``:

- ``device``: on the training accelerator (fastest; only on CUDA/MPS),
- ``cpu``: in host memory (pinned on CUDA for fast copies),
- ``disk``: a memory-mapped file in a temporary folder (``torch.from_file``), for pools larger
  than ``cache.max_memory_gb``; deleted when the cache is closed.

The storage dtype is ``cache.dtype`` (fp32 by default, which keeps caching exact; bf16/fp16
halve the memory at the price of rounding the trunk's output). Reads return float32 on the
training device.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

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
    size_bytes: int, device: torch.device, requested: str, max_memory_gb: float
) -> str:
    """Where a cache of `size_bytes` lives: the requested place, or for `auto` the first of
    device / cpu / disk that fits within ``max_memory_gb`` (and within free memory)."""
    limit = max_memory_gb * 1e9
    if requested != "auto":
        return "cpu" if requested == "device" and device.type == "cpu" else requested
    if device.type == "cuda" and size_bytes <= limit:
        free, _ = torch.cuda.mem_get_info(device)
        if size_bytes <= free // 2:
            return "device"
    if size_bytes <= limit:
        available = _available_host_bytes()
        if available is None or size_bytes <= available // 2:
            return "cpu"
    return "disk"


class ActivationCache:
    """Frozen-trunk outputs of a fixed list of micro-batches (see the module docstring)."""

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
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.offsets = [0]
        for rows in batch_rows:
            self.offsets.append(self.offsets[-1] + rows)
        n_rows = self.offsets[-1]
        shape = (n_rows, seq_len, d_model)
        element = torch.empty((), dtype=dtype).element_size()
        self.size_bytes = n_rows * seq_len * d_model * element
        self.location = choose_location(self.size_bytes, device, location, max_memory_gb)
        self._tempdir: str | None = None
        if self.location == "device":
            self.storage = torch.empty(shape, dtype=dtype, device=device)
        elif self.location == "cpu":
            pin = device.type == "cuda"
            self.storage = torch.empty(shape, dtype=dtype, pin_memory=pin)
        else:
            if directory is not None:
                os.makedirs(directory, exist_ok=True)
            self._tempdir = tempfile.mkdtemp(prefix="stackwise-cache-", dir=directory)
            path = os.path.join(self._tempdir, "activations.bin")
            numel = n_rows * seq_len * d_model
            self.storage = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
        # Number of blocks the cached activations have gone through (embedding = 0 blocks).
        self.prefix_end = 0
        self.filled = False

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def read(self, index: int) -> torch.Tensor:
        """Cached activations of micro-batch `index`, float32 on the training device."""
        rows = self.storage[self.offsets[index] : self.offsets[index + 1]]
        return rows.to(self.device, non_blocking=True).to(torch.float32)

    def write(self, index: int, hidden: torch.Tensor) -> None:
        target = self.storage[self.offsets[index] : self.offsets[index + 1]]
        target.copy_(hidden.detach().to(self.dtype))

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
        self.storage = torch.empty(0)
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __del__(self) -> None:
        if getattr(self, "_tempdir", None) is not None:
            self.close()
