"""The StackWise model library: Block -> Stack -> Rack and their attention modules.

See `stackwise.model.architecture` for the model and its builders and
`stackwise.model.attention` for MHA/GQA, MLA and kernel (linear) attention.
"""

from stackwise.config.blocks import BlockSpec, default_d_ff, default_n_heads
from stackwise.model.architecture import (
    Block,
    Rack,
    Stack,
    SwiGLU,
    create_block_spec,
    create_rack_from_config,
    create_rack_from_specs,
    create_simple_rack,
    create_stack_from_spec,
)
from stackwise.model.attention import (
    GroupedQueryAttention,
    KernelAttention,
    MultiHeadLatentAttention,
    RotaryEmbedding,
    default_n_features,
    redraw_kernel_features,
)

__all__ = [
    "Block",
    "BlockSpec",
    "GroupedQueryAttention",
    "KernelAttention",
    "MultiHeadLatentAttention",
    "Rack",
    "RotaryEmbedding",
    "Stack",
    "SwiGLU",
    "create_block_spec",
    "create_rack_from_config",
    "create_rack_from_specs",
    "create_simple_rack",
    "create_stack_from_spec",
    "default_d_ff",
    "default_n_features",
    "default_n_heads",
    "redraw_kernel_features",
]
