"""One resolved block spec per stack: the model config resolves it once (stack overrides applied
there), and the rack, the parameter count and the memory estimate all read that spec."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from stackwise.config import StackWiseConfig
from stackwise.config.blocks import BlockSpec
from stackwise.model import create_block_spec, create_rack_from_config
from stackwise.model.architecture import Block
from stackwise.training.memory import parameter_count


def _mixed() -> StackWiseConfig:
    return StackWiseConfig.from_dict(
        {
            "model": {
                "vocab_size": 50,
                "d_model": 32,
                "n_heads": 4,
                "n_kv_heads": 2,
                "dropout": 0.1,
                "stacks": [
                    {"n_blocks": 1},
                    {"n_blocks": 2, "n_heads": 8, "d_ff": 40, "dropout": 0.0},
                    {"n_blocks": 1, "attention_type": "mla"},
                    {"n_blocks": 1, "attention_type": "kernel", "freeze_up_proj": True},
                ],
            },
            "training": {"training_architecture": "rackwise"},
        }
    )


def test_stack_overrides_fall_back_to_the_model_and_defaults_are_filled_in() -> None:
    specs = _mixed().model.block_specs()
    # By hand: SwiGLU width 8/3 * 32 = 85.3 -> next multiple of 8 = 88.
    first, second, mla, kernel = specs
    assert (first.n_heads, first.n_kv_heads, first.d_ff, first.dropout) == (4, 2, 88, 0.1)
    assert (second.n_heads, second.n_kv_heads, second.d_ff, second.dropout) == (8, 2, 40, 0.0)
    # mla has no K/V heads; its latent defaults to d_model // 4 = 8 and its RoPE part to half
    # the head width (32 / 4 / 2 = 4).
    assert (mla.n_kv_heads, mla.kv_lora_rank, mla.qk_rope_head_dim) == (None, 8, 4)
    assert kernel.attention_type == "kernel" and kernel.freeze_up_proj
    assert not first.freeze_up_proj and first.attention_mode == "causal"


def test_every_block_of_the_rack_is_built_from_its_stacks_spec() -> None:
    config = _mixed()
    rack = create_rack_from_config(config)
    stacks = config.model.resolved_stacks()
    expected = [
        spec
        for stack, spec in zip(stacks, config.model.block_specs(), strict=True)
        for _ in range(stack.n_blocks)
    ]
    built = [block.block_spec for block in rack.blocks]
    assert built == expected
    # What the rack holds is what the parameter count counted.
    assert parameter_count(config) == sum(p.numel() for p in rack.parameters())


def test_a_spec_is_frozen_and_its_dict_rebuilds_the_same_block() -> None:
    spec = BlockSpec.resolve(64, n_heads=4, attention_type="gqa", n_kv_heads=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.d_ff = 1  # type: ignore[misc]
    assert create_block_spec(64, n_heads=4, attention_type="gqa", n_kv_heads=2) == spec.as_dict()
    assert Block(**spec.as_dict()).block_spec == spec


def test_an_unknown_block_setting_is_named() -> None:
    with pytest.raises(TypeError, match="n_kv_head"):
        Block(32, n_kv_head=2)


def test_resolving_a_spec_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from stackwise.config.base import StackWiseConfig\n"
        "StackWiseConfig().model.block_specs()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
