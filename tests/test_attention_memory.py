"""Memory of attention forward + backward on CPU grows linearly with sequence length for every
attention type whose kernel allows it (no T x T matrix is kept)."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from stackwise.model.architecture import create_block_spec
from stackwise.model.attention import MultiHeadLatentAttention


def _peak_bytes(module: torch.nn.Module, seq_len: int) -> int:
    """Peak bytes allocated during one forward + backward: running sum of the profiler's
    allocation (+) and free (-) records in time order."""
    x = torch.randn(1, seq_len, 64, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        module(x).sum().backward()
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, delta in records:
        live += delta
        peak = max(peak, live)
    return peak


def test_mla_memory_is_linear_in_sequence_length() -> None:
    # MLA's queries and keys (head width + RoPE width) are wider than its values; a T x T
    # attention matrix (4 heads x 1024² fp32 = 16 MiB, kept for backward) would make 4x the
    # length cost about 10x the memory here; linear memory costs about 4x.
    spec = create_block_spec(64, n_heads=4, attention_type="mla", attention_mode="causal")
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(
        d_model=64,
        n_heads=4,
        kv_lora_rank=spec["kv_lora_rank"],
        qk_rope_head_dim=spec["qk_rope_head_dim"],
        attention_mode="causal",
    )
    _peak_bytes(mla, 256)  # parameters' gradients allocated once, outside the comparison
    short, long = _peak_bytes(mla, 256), _peak_bytes(mla, 1024)
    assert long < 6 * short, (short, long)
