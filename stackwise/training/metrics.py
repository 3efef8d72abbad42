"""Measurements of a run: FLOPs, peak memory and model FLOPs utilisation (MFU).

FLOPs follow the usual accounting (Kaplan et al., nanoGPT): a forward pass costs 2 FLOPs per
matmul weight per token plus the attention term of each block; a training step of a trainable
piece costs about 3x its forward (backward ≈ 2x). A frozen trunk costs its forward only, and only
when it actually runs: once per sample when the activation cache is built or extended, or on
every step when the cache is off. Evaluation passes are not counted.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (reset at each stage). On the CPU it is
the peak resident set size of the whole process (VmHWM; reset per stage through
``/proc/self/clear_refs`` on Linux, else the lifetime peak from ``getrusage``) — so it includes
the Python interpreter, the data and anything else the process holds, not only training tensors.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path

import torch
from torch import nn

# Dense peak FLOP/s by GPU name substring: (bf16/fp16 tensor core, tf32 tensor core).
GPU_PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 494e12),
    "H100 NVL": (835e12, 418e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "A10G": (70e12, 35e12),
    "A10": (125e12, 62.5e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "V100": (125e12, 15.7e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "T4": (65e12, 8.1e12),
}


def linear_weight_count(module: nn.Module) -> int:
    """Number of matmul weights of the Linear layers in `module` (shared tensors once)."""
    weights = {id(m.weight): m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear)}
    return sum(weights.values())


def block_forward_flops(block: nn.Module, n_ctx: int) -> float:
    """Forward FLOPs per token of one block: 2 x matmul weights + its attention term."""
    attention = 0.0
    attn = getattr(block, "attn", None)
    if attn is not None and hasattr(attn, "attention_flops_per_token"):
        attention = float(attn.attention_flops_per_token(n_ctx))
    return 2.0 * linear_weight_count(block) + attention


def blocks_forward_flops(blocks: list[nn.Module], n_ctx: int) -> float:
    return sum(block_forward_flops(b, n_ctx) for b in blocks)


def readout_forward_flops(rack: nn.Module) -> float:
    """Forward FLOPs per token of the LM head (the final norm is negligible)."""
    lm_head = rack.lm_head
    assert isinstance(lm_head, nn.Linear)
    return 2.0 * lm_head.weight.numel()


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
