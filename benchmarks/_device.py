"""The device a benchmark runs on: ``--device {cpu,cuda}`` (default cpu) and, where it matters,
``--precision {fp32,bf16}``, checked before anything is measured; the clock that waits for the
GPU; the autocast the trainer uses for ``training.precision``; and the GPU's datasheet peak.

On CUDA the trainer runs fp32 matmuls on TF32 tensor cores (`stackwise.training.device`), so an
fp32 benchmark there enables TF32 as well and compares against the TF32 peak; bf16 is
``torch.autocast("cuda", dtype=torch.bfloat16)``, exactly what ``training.precision: bf16`` does.
The datasheet figures are the library's table (`stackwise.training.metrics.GPU_PEAK_FLOPS`,
sources beside each entry).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import torch

from stackwise.training.metrics import device_peak_flops


def add_arguments(parser: argparse.ArgumentParser, precision: bool = True) -> None:
    """``--device`` and (with `precision`) ``--precision``."""
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)"
    )
    if precision:
        parser.add_argument(
            "--precision",
            choices=("fp32", "bf16"),
            default="fp32",
            help="bf16: autocast, as training.precision: bf16 (CUDA only)",
        )


def fail(parser: argparse.ArgumentParser, message: str) -> None:
    """Stop with a one-line error naming the script (status 2, as for a usage error)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A one-line error (status 2) for a device or precision this machine cannot run."""
    if args.device == "cuda" and not torch.cuda.is_available():
        fail(parser, "--device cuda: no CUDA device here (torch.cuda.is_available() is false)")
    if getattr(args, "precision", "fp32") != "fp32" and args.device == "cpu":
        fail(parser, f"--precision {args.precision} needs --device cuda (the CPU trains in fp32)")
    if args.device == "cuda" and getattr(args, "clock", "wall") != "wall":
        fail(
            parser, "--clock thread_cpu times CPU work only; use the wall clock with --device cuda"
        )
    if args.device == "cuda":
        # As the trainer does on CUDA: fp32 matmuls on TF32 tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work (nothing on the CPU), so a clock read after it is fair."""
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast the trainer enters for `precision` on `device` (none for fp32)."""
    if device == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def datasheet_peak(device: str, precision: str) -> dict[str, Any] | None:
    """The GPU's dense datasheet peak for `precision` (TF32 for fp32), or None on the CPU and
    for GPUs not in the table."""
    if device != "cuda":
        return None
    flops = device_peak_flops(torch.device("cuda"), precision)
    if flops is None:
        return None
    return {
        "gpu": torch.cuda.get_device_name(),
        "precision": "bf16" if precision == "bf16" else "tf32",
        "flops_per_s": flops,
    }
