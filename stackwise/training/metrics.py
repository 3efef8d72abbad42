"""Measurements of a run: peak memory, memory in parts and model FLOPs utilisation (MFU).

FLOPs are counted by the rule in `stackwise.training.flops`; MFU divides them by the training
seconds and the device's peak (`device_peak_flops`).

Memory is reported in parts, so that a plan (`stackwise.training.memory.estimate_run`) and a run
speak of the same quantities:

- *training memory* (`TrainingMemory`): what the running stage itself needs — the rack's
  weights on the training device, one gradient per trainable parameter, the optimizer state and
  the activations autograd keeps for backward of one micro-batch (`SavedActivations`: every
  tensor saved for backward, each storage once, parameters excluded; a micro-batch read from
  the activation cache in memory is a view of the cache's tensor and counts the bytes it spans,
  since the cache is *cache memory*). These are counted tensor
  by tensor, so they mean the same on every device and exclude the interpreter.
  `estimate_training_memory` counts the same tensors without allocating them: the stage's
  forward runs on fake tensors (`torch._subclasses.FakeTensorMode`, shapes and dtypes only).
- *cache memory*: bytes of the activation cache held in RAM or on the device, and bytes on disk
  (`stackwise.training.cache.ActivationCache.memory_bytes` / ``disk_bytes``).
- the *process peak* (`PeakMemory`): ``torch.cuda.max_memory_allocated`` on CUDA (reset at each
  stage). On the CPU it is the peak resident set size of the whole process (VmHWM; reset per
  stage through ``/proc/self/clear_refs`` on Linux, else the lifetime peak from ``getrusage``) —
  so it includes the Python interpreter, the data and anything else the process holds.

`MemoryReport` gathers the parts of one stage (or run) and names their metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

# Dense peak FLOP/s by GPU name substring: (bf16/fp16 tensor core, tf32 tensor core). First
# match wins, so longer names come before their prefixes ("H100 NVL" before "H100", "L40S" and
# "L40" before "L4"). Sources: NVIDIA's product datasheets, which quote tensor-core figures
# "with sparsity"; the dense figure is half of that.
GPU_PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200 NVL": (835e12, 418e12),  # H200 NVL datasheet: BF16 1,671 / TF32 835 sparse
    "H200": (989e12, 494e12),  # H200 SXM datasheet: BF16 1,979 / TF32 989 sparse
    "H100 NVL": (835e12, 418e12),  # H100 NVL datasheet (per GPU): BF16 1,671 / TF32 835 sparse
    "H100 PCIe": (756e12, 378e12),  # H100 PCIe datasheet: BF16 1,513 / TF32 756 sparse
    "H100": (989e12, 494e12),  # H100 SXM datasheet: BF16 1,979 / TF32 989 sparse
    "A100": (312e12, 156e12),  # A100 datasheet (SXM and PCIe): BF16 312 / TF32 156 dense
    "A10G": (70e12, 35e12),  # no NVIDIA datasheet (AWS G5 part); commonly quoted figures
    "A10": (125e12, 62.5e12),  # A10 datasheet: BF16 125 / TF32 62.5 dense
    "L40S": (362e12, 183e12),  # L40S datasheet: BF16 733 / TF32 366 sparse
    "L40": (181e12, 90.5e12),  # L40 datasheet: BF16 362 / TF32 181 sparse
    "L4": (121e12, 60e12),  # L4 datasheet: BF16 242 / TF32 120 sparse
    "V100": (125e12, 15.7e12),  # V100 SXM2 datasheet: FP16 tensor 125, FP32 15.7 (no bf16, tf32)
    "RTX 4090": (165e12, 82.6e12),  # Ada whitepaper: BF16 (FP32 accumulate) 165.2 / TF32 82.6
    "RTX 3090": (71e12, 35.6e12),  # Ampere GA102 whitepaper: BF16 71 / TF32 35.6 dense
    "T4": (65e12, 8.1e12),  # T4 datasheet: FP16 tensor 65, FP32 8.1 (no bf16, tf32)
}


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of `device` for `precision`, when known (CUDA GPUs in the table)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in GPU_PEAK_FLOPS.items():
        if key in name:
            return half if precision in ("bf16", "fp16") else tf32
    return None


def _read_vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or restricted: fall back to the peak
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start (or the last reset), in bytes."""
    value = _read_vm_hwm()
    if value is not None:
        return value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakMemory:
    """Peak memory of one measured interval on `device` (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.device.type == "mps":
            with contextlib.suppress(Exception):
                return int(torch.mps.driver_allocated_memory())
        return peak_rss_bytes()


# --------------------------------------------------------------------------------------------
# memory in parts
# --------------------------------------------------------------------------------------------


def _storage_key(tensor: torch.Tensor) -> int:
    """Identity of the memory behind `tensor` (views of one storage share it)."""
    return int(tensor.untyped_storage()._cdata)


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind `tensors`, each storage once."""
    storages: dict[int, int] = {}
    for tensor in tensors:
        storages.setdefault(_storage_key(tensor), tensor.untyped_storage().nbytes())
    return sum(storages.values())


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[start, end)`` of its storage that `tensor`'s own elements occupy."""
    size = tensor.element_size()
    start = int(tensor.storage_offset()) * size
    if tensor.numel() == 0:
        return start, start
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride(), strict=True))
    return start, start + extent * size


def _union_length(ranges: list[tuple[int, int]]) -> int:
    """Bytes covered by byte ranges that may overlap, each byte once."""
    total, end = 0, -1
    for start, stop in sorted(ranges):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


class SavedActivations:
    """Bytes of the tensors autograd saves for backward while the context is active.

    Each storage counts once (a tensor saved by several ops, or views of one tensor), and the
    storages of `exclude` (the parameters: they are weights, counted as such) not at all. A
    saved view of one of the `shared` storages (the activation cache in memory: a micro-batch
    read from it is a view of its one tensor) counts only the bytes it spans, each byte once:
    the rest of that storage is held, and counted, by its owner. The saved tensors are kept
    referenced until the context ends, so no storage is freed and its identity reused while
    counting (the autograd graph holds them anyway).
    """

    def __init__(
        self, exclude: Iterable[torch.Tensor] = (), shared: Iterable[torch.Tensor] = ()
    ) -> None:
        self._excluded = {_storage_key(t) for t in exclude}
        self._shared = {_storage_key(t) for t in shared} - self._excluded
        self._saved: dict[int, torch.Tensor] = {}
        self._views: list[torch.Tensor] = []
        self._spans: dict[int, list[tuple[int, int]]] = {}
        self._hooks: Any = None
        self._owned_bytes = 0

    @property
    def bytes(self) -> int:
        """Bytes saved so far: whole storages, and the spans of views of shared ones."""
        return self._owned_bytes + sum(_union_length(s) for s in self._spans.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self._excluded:
            if key in self._shared:
                self._views.append(tensor)
                self._spans.setdefault(key, []).append(_span(tensor))
            elif key not in self._saved:
                self._saved[key] = tensor
                self._owned_bytes += tensor.untyped_storage().nbytes()
        # Detached (same storage; autograd restores the graph on unpacking): a saved output
        # kept with its grad_fn would hold that grad_fn, which holds it, a cycle through C++
        # that no garbage collection frees when the graph never runs backward (an estimate).
        return tensor.detach()

    def __enter__(self) -> SavedActivations:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._hooks.__exit__(kind, error, trace)
        self._saved.clear()
        self._views.clear()


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class TrainingMemory:
    """What a training stage holds (see the module docstring), in bytes."""

    weights_bytes: int  # the rack's parameters and buffers on the training device
    gradients_bytes: int  # one gradient per trainable parameter
    optimizer_bytes: int  # optimizer state (AdamW: two moments and a step count per tensor)
    activations_bytes: int  # tensors saved for backward by one micro-batch's forward

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.gradients_bytes
            + self.optimizer_bytes
            + self.activations_bytes
        )


def _resident_tensors(rack: nn.Module, buffers: bool) -> list[torch.Tensor]:
    """The rack's parameters (and buffers) in memory, each once: out of core, blocks that are
    away are not visited (`Rack.resident_modules`)."""
    tops = rack.resident_modules() if hasattr(rack, "resident_modules") else [rack]  # type: ignore[operator]
    found: dict[int, torch.Tensor] = {}
    for top in tops:
        for tensor in [*top.parameters(), *(top.buffers() if buffers else ())]:
            found.setdefault(id(tensor), tensor)
    return list(found.values())


def measure_training_memory(
    rack: nn.Module,
    params: Iterable[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    activations_bytes: int,
    device: torch.device,
) -> TrainingMemory:
    """Training memory of a running stage, counted on its real tensors.

    `params` are the parameters the stage trains; `optimizer` must have taken a step (its state
    exists from the first step on); `activations_bytes` is a `SavedActivations` count of one
    micro-batch's forward (and loss) of the stage.
    """

    def on_device(tensor: torch.Tensor) -> bool:
        return tensor.device.type == device.type and (
            device.index is None or tensor.device.index == device.index
        )

    weights = [t for t in _resident_tensors(rack, buffers=True) if on_device(t)]
    trainable = {id(p): p for p in params if p.requires_grad}
    state = [
        value
        for per_param in optimizer.state.values()
        for value in per_param.values()
        if isinstance(value, torch.Tensor)
    ]
    return TrainingMemory(
        weights_bytes=_tensor_bytes(weights),
        gradients_bytes=sum(p.numel() * p.element_size() for p in trainable.values()),
        optimizer_bytes=_tensor_bytes(state),
        activations_bytes=int(activations_bytes),
    )


class StageMemoryProbe:
    """The training memory of a running stage, measured once, on its first optimizer step.

    The trainer counts the tensors saved for backward by the step's first micro-batch
    (`saving`) and, once the optimizer has stepped (weights, gradients and optimizer state all
    exist then), the rest (`measure`). Compiled graphs keep their own saved tensors, so a probe
    that is not `enabled` (under ``torch.compile``) measures nothing. `shared` gives the
    storages of the activation cache (see `SavedActivations`).
    """

    def __init__(
        self,
        rack: nn.Module,
        device: torch.device,
        shared: Callable[[], Iterable[torch.Tensor]] = tuple,
        enabled: bool = True,
    ) -> None:
        self.rack = rack
        self.device = device
        self.shared = shared
        self.enabled = enabled
        self.memory: TrainingMemory | None = None
        self._saved: SavedActivations | None = None

    def saving(self, micro: int) -> contextlib.AbstractContextManager[Any]:
        """Count what micro-batch `micro`'s forward saves (the first of the first step only)."""
        if not self.enabled or self.memory is not None or micro != 0:
            return contextlib.nullcontext()
        self._saved = SavedActivations(
            _resident_tensors(self.rack, buffers=False), shared=self.shared()
        )
        return self._saved

    def measure(self, params: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        """Complete the measurement after the optimizer step whose forward was counted."""
        if self._saved is None:
            return
        self.memory = measure_training_memory(
            self.rack, params, optimizer, self._saved.bytes, self.device
        )
        self._saved = None


class _StagePass(nn.Module):
    """The forward of a stage (as the trainer runs it): embedding or a given trunk output ->
    `blocks` in order -> readout."""

    def __init__(self, rack: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.rack = rack
        self.blocks = blocks  # modules of `rack` (a plain list: their names stay the rack's)

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        h = self.rack.embed(inputs) if hidden is None else hidden  # type: ignore[operator]
        for block in self.blocks:
            h = block(h)
        return self.rack.readout(h)  # type: ignore[operator]


def estimate_activation_bytes(
    rack: nn.Module,
    start: int,
    end: int,
    *,
    from_embedding: bool,
    trainable: set[int],
    batch: Any,
    loss: Callable[[torch.Tensor, Any], torch.Tensor],
    autocast_dtype: torch.dtype | None = None,
    mode: Any = None,
    blocks: Sequence[int] | None = None,
) -> int:
    """`SavedActivations` of one micro-batch of a stage, counted without allocating anything.

    The stage's forward and `loss` run on fake CPU tensors standing in for the rack's weights
    (``trainable`` holds the ids of the parameters that require gradients), so every op saves
    for backward exactly what it saves in training. `rack` should be a skeleton (built on the
    meta device): modules that cache tensors keep fake ones. `batch` is one micro-batch (a
    dataclass of tensors with the token ids as ``inputs``, such as an objective's `Corruption`),
    given to ``loss(logits, batch)`` as fake tensors of its shapes and dtypes; a stage that does
    not start `from_embedding` reads a trunk output without gradient instead. `autocast_dtype` runs the forward under CPU autocast, as an estimate of
    mixed precision on an accelerator. Pass one `mode` (`fake_tensor_mode`) to several calls on
    the same rack. `blocks`: run these block indices instead of ``[start, end)``.
    """
    from torch.func import functional_call

    from stackwise.training.fake_tensors import compiler_settings_only, fake_tensor_mode

    mode = mode if mode is not None else fake_tensor_mode()
    with compiler_settings_only(), mode:
        fakes: dict[int, torch.Tensor] = {}
        state: dict[str, torch.Tensor] = {}
        # Only what the stage runs: the cost of an estimate does not grow with the depth.
        modules = rack.stage_modules(start, end, blocks)  # type: ignore[operator]
        for prefix, module in modules:
            for name, param in module.named_parameters(remove_duplicate=False):
                if id(param) not in fakes:
                    fakes[id(param)] = torch.empty(
                        param.shape, dtype=param.dtype, requires_grad=id(param) in trainable
                    )
                state[f"rack.{prefix}.{name}"] = fakes[id(param)]
            for name, buffer in module.named_buffers(remove_duplicate=False):
                state[f"rack.{prefix}.{name}"] = torch.empty(buffer.shape, dtype=buffer.dtype)
        # Fresh fakes rather than conversions: converting a real tensor needs PyTorch's compiler.
        batch = dataclasses.replace(
            batch,
            **{
                field.name: torch.empty(value.shape, dtype=value.dtype)
                for field in dataclasses.fields(batch)
                if isinstance(value := getattr(batch, field.name), torch.Tensor)
            },
        )
        inputs = batch.inputs
        d_model = int(rack.d_model)  # type: ignore[arg-type]
        hidden = None if from_embedding else torch.empty(*inputs.shape, d_model)
        autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if autocast_dtype is not None:
            autocast = torch.autocast("cpu", dtype=autocast_dtype)
        with SavedActivations(fakes.values()) as saved, autocast:
            stage = _StagePass(rack, [m for name, m in modules if name.startswith("stacks.")])
            logits = functional_call(stage, state, (inputs, hidden))
            loss(logits, batch)
        return saved.bytes


@dataclass(frozen=True)
class MemoryReport:
    """Memory of one stage (or a whole run: the largest of its stages), in bytes."""

    training: TrainingMemory
    cache_memory_bytes: int  # activation cache held in RAM or on the device
    cache_disk_bytes: int  # activation cache in a file on disk
    peak_bytes: int  # the process peak (`PeakMemory`)

    def metrics(self) -> dict[str, float]:
        """Flat metrics (names as the tracking layer records them, e.g. ``stage/<name>``)."""
        return {
            "training_memory_bytes": float(self.training.total_bytes),
            "weights_bytes": float(self.training.weights_bytes),
            "gradients_bytes": float(self.training.gradients_bytes),
            "optimizer_state_bytes": float(self.training.optimizer_bytes),
            "activations_bytes": float(self.training.activations_bytes),
            "cache_memory_bytes": float(self.cache_memory_bytes),
            "cache_disk_bytes": float(self.cache_disk_bytes),
            "peak_memory_bytes": float(self.peak_bytes),
        }
