"""Int8 weight-only linear layers: a frozen piece held in a quarter of its fp32 bytes.

`quantize_linear_int8` turns every ``nn.Linear`` of a module, in place, into an `Int8Linear`:
its weight is held as int8, one row per output feature, with one fp32 scale per row
(symmetric, ``scale = max|w_row| / 127``, rounded to nearest), and each forward multiplies the
int8 rows back out and runs the ordinary fp32 matmul. Dequantizing costs one pass over the
weight per call, against the matmul's one pass per token, so a forward over a batch of tokens
takes about the time of fp32 (`benchmarks/bench_quantization.py`: 1.00x). torchao's weight-only
int8, which runs a fused int8 matmul kernel on a CPU, took 2.06x the time of fp32 in that
benchmark, and its kernel alone about 40x an fp32 matmul of the same shape.

The module stays an ``nn.Linear`` (its class is switched in place, so hooks, names and
parameter counts by weight shape are unchanged); `Int8Linear.to_linear` turns it back with
given fp32 weights. Activations, norms and biases stay in their own precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` as int8 rows and one fp32 scale per row: ``q * scale ≈ weight``."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(weight / scale.unsqueeze(1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class Int8Linear(nn.Linear):
    """An ``nn.Linear`` holding its weight as int8 rows (buffer ``weight``) and per-row fp32
    scales (buffer ``weight_scale``, not saved); made by `quantize_linear_int8`, never built."""

    weight_scale: torch.Tensor

    def __init__(self) -> None:
        raise TypeError("Int8Linear is made from an nn.Linear by quantize_linear_int8")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight: torch.Tensor = self.dequantized()
        bias: torch.Tensor | None = self.bias
        if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def dequantized(self) -> torch.Tensor:
        """The weight as the forward uses it, fp32: each int8 row times its scale."""
        return self.weight.to(self.weight_scale.dtype) * self.weight_scale.unsqueeze(1)

    def to_linear(self, weight: torch.Tensor) -> None:
        """Back to a plain ``nn.Linear`` with ``weight`` (fp32, kept frozen), in place."""
        del self._buffers["weight_scale"]
        self.__class__ = nn.Linear  # type: ignore[assignment]
        self.weight = nn.Parameter(weight, requires_grad=False)  # replaces the int8 buffer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 weight-only"


def quantize_linear_int8(module: nn.Module) -> int:
    """Every plain ``nn.Linear`` in `module` becomes an `Int8Linear` in place (its weight
    quantized, its bias kept); returns how many. Call it on frozen modules only: the int8
    weight takes no gradient."""
    count = 0
    for child in module.modules():
        if type(child) is not nn.Linear:
            continue
        q, scale = quantize_rows(child.weight)
        del child._parameters["weight"]
        child.register_buffer("weight", q)
        child.register_buffer("weight_scale", scale, persistent=False)
        child.__class__ = Int8Linear
        count += 1
    return count
