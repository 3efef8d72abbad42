"""Every code example of the StackWise architecture guide, run as written.

Imports read ``stackwise.model.``, ``stackwise.config.`` and ``stackwise.training.`` instead of
``model.``, ``config.`` and ``training.``; where the guide writes ``...`` small concrete values
are filled in; ``config.yaml`` is a small file in ``tmp_path`` using the real config schema.
Each test checks what the example prints or builds.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.model.architecture import (
    Block,
    Rack,
    Stack,
    create_block_spec,
    create_rack_from_config,
    create_rack_from_specs,
    create_simple_rack,
    create_stack_from_spec,
)


def block_params(d: int, f: int, n_heads: int, n_kv_heads: int) -> int:
    kv = 2 * d * n_kv_heads * (d // n_heads)
    return 2 * d * d + kv + 3 * d * f + 2 * d


def total_blocks(rack: Rack) -> int:
    return sum(len(stack.blocks) for stack in rack.stacks)


# -- Block, Stack, Rack ----------------------------------------------------------------------


def test_block_example() -> None:
    # Create a single block
    block = Block(
        d_model=512, d_ff=2048, n_heads=8, n_kv_heads=2, attention_type="gqa",
        attention_mode="bidirectional",
    )  # fmt: skip
    assert block.attention_type == "gqa" and block.attention_mode == "bidirectional"
    assert block.attn.n_kv_heads == 2 and block.ffn.up_proj.out_features == 2048
    assert block(torch.randn(1, 6, 512)).shape == (1, 6, 512)


def test_stack_example() -> None:
    # Create a stack with multiple blocks  (Block(...) filled in)
    blocks = [Block(d_model=64, n_heads=4) for _ in range(4)]
    stack = Stack(blocks, stack_id=0)
    assert stack.stack_id == 0 and len(stack.blocks) == 4 and not stack.is_frozen
    assert stack(torch.randn(2, 5, 64)).shape == (2, 5, 64)


def make_seed_rack() -> Rack:
    # Create the complete model  (Stack(...) filled in with small blocks of width 512)
    stacks = [
        Stack([Block(d_model=512, d_ff=256) for _ in range(2)], stack_id=0),
        Stack([Block(d_model=512, d_ff=256) for _ in range(1)], stack_id=1),
    ]
    rack = Rack(stacks=stacks, vocab_size=50000, d_model=512, tie_embeddings=True)
    return rack


def test_rack_example() -> None:
    rack = make_seed_rack()
    assert len(rack.stacks) == 2 and rack.n_blocks == 3
    assert rack.lm_head.weight is rack.token_embedding.weight
    assert rack.get_parameter_count() == 50000 * 512 + 3 * block_params(512, 256, 8, 8) + 512


# -- configuration ---------------------------------------------------------------------------


SEED_MODEL_YAML = """\
model:
  # Model dimensions
  d_model: 4096
  n_heads: 32
  n_kv_heads: 8
  d_ff: 14336
  # Architecture configuration
  architecture:
    n_stacks: 2 # Number of stacks
    blocks_per_stack: 4 # Number of blocks per stack
"""


def test_yaml_model_section_example(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(SEED_MODEL_YAML)
    config = StackWiseConfig.from_yaml(path)
    assert config.model.architecture.n_stacks == 2
    assert config.model.architecture.blocks_per_stack == 4
    assert config.model.n_blocks == 8
    # This is a 1.7B-parameter model: build it on the meta device (shapes only) to check it.
    with torch.device("meta"):
        rack = create_rack_from_config(config.to_dict())
    assert [len(s.blocks) for s in rack.stacks] == [4, 4]
    assert rack.blocks[0].attn.n_kv_heads == 8
    expected = 260 * 4096 + 8 * block_params(4096, 14336, 32, 8) + 4096
    assert rack.get_parameter_count() == expected


def test_dataclass_schema_example() -> None:
    # The guide's ArchitectureConfig / ModelConfig classes: the real schema (pydantic) has the
    # same fields and defaults.
    from stackwise.config.base import ArchitectureConfig, BaseConfig, ModelConfig

    assert issubclass(ArchitectureConfig, BaseConfig) and issubclass(ModelConfig, BaseConfig)
    architecture = ArchitectureConfig()
    assert (architecture.n_stacks, architecture.blocks_per_stack) == (2, 4)
    assert isinstance(ModelConfig().architecture, ArchitectureConfig)


# -- helper functions ------------------------------------------------------------------------


def seed_block_spec() -> dict:
    # Create a block specification
    block_spec = create_block_spec(
        d_model=512, d_ff=2048, n_heads=8, n_kv_heads=2, attention_type="gqa",
        attention_mode="bidirectional",
    )  # fmt: skip
    return block_spec


def test_create_block_spec_example() -> None:
    block_spec = seed_block_spec()
    assert block_spec["d_model"] == 512 and block_spec["d_ff"] == 2048
    assert (block_spec["n_heads"], block_spec["n_kv_heads"]) == (8, 2)
    assert block_spec["attention_type"] == "gqa"
    assert block_spec["attention_mode"] == "bidirectional"


def test_create_stack_from_spec_example() -> None:
    block_spec = seed_block_spec()
    # Create a stack with identical blocks
    stack = create_stack_from_spec(
        stack_id=0, n_blocks=4, block_spec=block_spec, freeze_blocks=False
    )
    assert stack.stack_id == 0 and len(stack.blocks) == 4 and not stack.is_frozen
    assert all(block.spec() == block_spec for block in stack.blocks)


def test_create_simple_rack_example() -> None:
    # Create a simple rack: 2 stacks, 4 blocks per stack
    rack = create_simple_rack(
        n_stacks=2, blocks_per_stack=4, d_model=512, d_ff=2048, n_heads=8, vocab_size=10000
    )
    # 2 stacks, 4 blocks per stack = 8 total blocks
    assert len(rack.stacks) == 2 and total_blocks(rack) == 8
    assert rack.get_parameter_count() == 10000 * 512 + 8 * block_params(512, 2048, 8, 8) + 512


def test_create_rack_from_specs_example() -> None:
    block_spec = seed_block_spec()
    # Create stack specifications
    stack_specs = [
        {"stack_id": 0, "n_blocks": 4, "block_spec": block_spec, "freeze_blocks": False},
        {"stack_id": 1, "n_blocks": 4, "block_spec": block_spec, "freeze_blocks": True},  # Frozen
    ]
    # Create rack
    rack = create_rack_from_specs(
        vocab_size=10000, d_model=512, stack_specs=stack_specs, tie_embeddings=True
    )
    assert [s.stack_id for s in rack.stacks] == [0, 1]
    assert not rack.stacks[0].is_frozen and rack.stacks[1].is_frozen
    frozen = 4 * block_params(512, 2048, 8, 2)
    assert rack.get_parameter_count(trainable_only=True) == rack.get_parameter_count() - frozen


def write_config_yaml(tmp_path, **training: object) -> str:
    """A small config.yaml with the real schema (the guide's file, scaled down to run fast)."""
    lines = "\n".join(f"  {key}: {value}" for key, value in training.items())
    text = textwrap.dedent(
        """\
        model:
          d_model: 32
          n_heads: 4
          n_kv_heads: 2
          d_ff: 64
          attention_type: gqa
          attention_mode: causal
          architecture:
            n_stacks: 2
            blocks_per_stack: 2
        training:
          seed: 0
          device: cpu
          batch_size: 4
          seq_len: 16
          budget:
            steps: 8
          eval:
            batches: 1
        """
    )
    path = tmp_path / "config.yaml"
    path.write_text(text + lines + ("\n" if lines else ""))
    return str(path)


def test_create_rack_from_config_example(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_config_yaml(tmp_path)
    # Load configuration and create rack
    config = StackWiseConfig.from_yaml("config.yaml")
    rack = create_rack_from_config(config.to_dict())
    assert len(rack.stacks) == 2 and total_blocks(rack) == 4
    assert rack.is_causal and rack.blocks[0].attn.n_kv_heads == 2
    assert rack.get_parameter_count() == 260 * 32 + 4 * block_params(32, 64, 4, 2) + 32


# -- training modes (need ArchitectureTrainer) ------------------------------------------------


def tiny_dataloader(n_batches: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (4, 16), generator=generator) for _ in range(n_batches)]


@pytest.mark.parametrize(
    ("training_architecture", "expected_stages"),
    [("blockwise", 4), ("stackwise", 2), ("rackwise", 1)],
)
def test_training_mode_examples(
    tmp_path, monkeypatch, training_architecture: str, expected_stages: int
) -> None:
    monkeypatch.chdir(tmp_path)
    write_config_yaml(tmp_path)
    from stackwise.training.architecture_trainer import ArchitectureTrainer

    config = StackWiseConfig.from_yaml("config.yaml")
    rack = create_rack_from_config(config.to_dict())
    dataloader = tiny_dataloader()

    config.training.training_architecture = training_architecture
    trainer = ArchitectureTrainer(config)
    results = trainer.train_architecture(rack, dataloader)

    assert results.training_architecture == training_architecture
    assert len(results.stages) == expected_stages
    assert results.total_steps == 8
    assert math.isfinite(results.final_train_loss)


def test_complete_training_example(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_config_yaml(tmp_path)
    from stackwise.training.architecture_trainer import ArchitectureTrainer

    # Load configuration
    config = StackWiseConfig.from_yaml("config.yaml")
    # Create rack
    rack = create_rack_from_config(config.to_dict())
    dataloader = tiny_dataloader()
    # Create trainer
    trainer = ArchitectureTrainer(config)
    # Train the architecture
    results = trainer.train_architecture(rack, dataloader)
    assert results.training_architecture == "rackwise" and len(results.stages) == 1
    assert math.isfinite(results.final_train_loss)


# -- usage patterns --------------------------------------------------------------------------


def test_mixed_architecture_example() -> None:
    # Different block types for different stacks
    encoder_spec = create_block_spec(d_model=256, attention_mode="bidirectional")
    decoder_spec = create_block_spec(d_model=256, attention_mode="causal")
    # Create stack specifications
    stack_specs = [
        {"stack_id": 0, "n_blocks": 3, "block_spec": encoder_spec},
        {"stack_id": 1, "n_blocks": 3, "block_spec": decoder_spec},
    ]
    # Create rack
    rack = create_rack_from_specs(5000, 256, stack_specs)
    modes = [block.attention_mode for block in rack.blocks]
    assert modes == ["bidirectional"] * 3 + ["causal"] * 3
    # defaults derived from d_model: 256 / 64 = 4 heads, SwiGLU width 8/3 * 256 -> 688
    assert {(b.spec()["n_heads"], b.spec()["d_ff"]) for b in rack.blocks} == {(4, 688)}
    assert rack(torch.randint(0, 5000, (1, 8))).shape == (1, 8, 5000)


def test_model_size_examples() -> None:
    # `...` filled in with a small width and vocabulary.
    size = {"d_model": 64, "n_heads": 2, "vocab_size": 300}
    # Small model
    small = create_simple_rack(n_stacks=1, blocks_per_stack=2, **size)
    # Medium model
    medium = create_simple_rack(n_stacks=2, blocks_per_stack=3, **size)
    # Large model
    large = create_simple_rack(n_stacks=3, blocks_per_stack=4, **size)
    assert [total_blocks(r) for r in (small, medium, large)] == [2, 6, 12]
    assert [len(r.stacks) for r in (small, medium, large)] == [1, 2, 3]
    assert small.get_parameter_count() < medium.get_parameter_count() < large.get_parameter_count()


def test_training_granularity_examples() -> None:
    size = {"d_model": 32, "n_heads": 2, "vocab_size": 300}
    # Layer-wise: 8 stacks, 1 block each
    layerwise = create_simple_rack(n_stacks=8, blocks_per_stack=1, **size)
    # Block-wise: 2 stacks, 4 blocks each
    blockwise = create_simple_rack(n_stacks=2, blocks_per_stack=4, **size)
    # Stack-wise: 1 stack, 8 blocks
    stackwise = create_simple_rack(n_stacks=1, blocks_per_stack=8, **size)
    assert [len(r.stacks) for r in (layerwise, blockwise, stackwise)] == [8, 2, 1]
    assert {total_blocks(r) for r in (layerwise, blockwise, stackwise)} == {8}
    counts = {r.get_parameter_count() for r in (layerwise, blockwise, stackwise)}
    assert len(counts) == 1  # same model, grouped differently


def test_training_optimized_example() -> None:
    # Architecture optimized for training
    block_spec = create_block_spec(
        d_model=512, d_ff=2048, n_heads=8, attention_type="gqa", attention_mode="bidirectional",
        dropout=0.1, freeze_up_proj=True,
    )  # fmt: skip
    stack_specs = [
        {"stack_id": 0, "n_blocks": 4, "block_spec": block_spec, "freeze_blocks": False},
        {"stack_id": 1, "n_blocks": 4, "block_spec": block_spec, "freeze_blocks": False},
    ]
    rack = create_rack_from_specs(10000, 512, stack_specs)
    assert total_blocks(rack) == 8
    assert all(not block.ffn.up_proj.weight.requires_grad for block in rack.blocks)
    frozen_up = 8 * 512 * 2048
    assert rack.get_parameter_count(trainable_only=True) == rack.get_parameter_count() - frozen_up
    assert all(block.dropout.p == 0.1 for block in rack.blocks)


def test_forward_pass_and_model_information_example(capsys) -> None:
    rack = make_seed_rack()
    batch_size, seq_len = 2, 7
    # Forward pass
    input_ids = torch.randint(0, 50000, (batch_size, seq_len))
    logits = rack(input_ids)
    # Get model information
    print(f"Parameters: {rack.get_parameter_count():,}")
    print(f"Stacks: {len(rack.stacks)}")
    print(f"Total blocks: {sum(len(stack.blocks) for stack in rack.stacks)}")

    assert logits.shape == (batch_size, seq_len, 50000)
    expected = 50000 * 512 + 3 * block_params(512, 256, 8, 8) + 512
    assert capsys.readouterr().out.splitlines() == [
        f"Parameters: {expected:,}",
        "Stacks: 2",
        "Total blocks: 3",
    ]
